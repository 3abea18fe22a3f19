"""Runs queued jobs one at a time, each in its own training process.

A child process per job means a cancel is a clean stop, a crash or OOM fails only the job, and
GPU memory is returned. The child reports events (events.py) as JSON lines on stdout; this module
turns them into persisted job events and artifact records. A job found RUNNING at start-up (the
server died under it) is queued again and its new process resumes from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from trainer_service.events import Checkpoint, FinalArtifact, JobEvent, Log, parse_line
from trainer_service.jobdir import JobDir
from trainer_service.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from trainer_service.training.run import EXIT_CANCELLED

log = logging.getLogger("loraforge.trainer.worker")

CANCEL_GRACE_S = 30.0
MAX_EVENT_LINE = 64 * 1024 * 1024


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        jobs_dir: Path,
        artifacts_dir: Path,
        *,
        device: str = "auto",
        num_processes: int = 1,
        on_event: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.store = store
        self.jobs_dir = jobs_dir
        self.artifacts_dir = artifacts_dir
        self.device = device
        self.num_processes = num_processes
        self.on_event = on_event
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._current: tuple[str, asyncio.subprocess.Process] | None = None
        self._cancelled: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for job in self.store.jobs_in_state(RUNNING):
            self.store.append_event(job.job_id, Log(
                "warning", "the server restarted during this job; resuming from its last "
                "checkpoint",
            ))  # fmt: skip
            self.store.set_state(job.job_id, QUEUED, "resuming after a server restart")
            self.on_event(job.job_id)
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop taking jobs; stop the running one at its next step (it resumes on restart)."""
        self._stopping = True
        self._wakeup.set()
        if self._current is not None:
            _, process = self._current
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, CANCEL_GRACE_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._kill_current()

    def _kill_current(self) -> None:
        if self._current is not None:
            with contextlib.suppress(ProcessLookupError):
                self._current[1].kill()

    # ------------------------------------------------------------------ cancel
    async def cancel(self, job_id: str) -> None:
        """Cancel a queued job now, or stop a running one within one step."""
        job = self.store.get_job(job_id)
        if job is None or job.state not in (QUEUED, RUNNING):
            return
        if job.state == QUEUED and (self._current is None or self._current[0] != job_id):
            self.store.set_state(job_id, CANCELLED, "cancelled by request")
            self.on_event(job_id)
            return
        self._cancelled.add(job_id)
        if self._current is not None and self._current[0] == job_id:
            process = self._current[1]
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), CANCEL_GRACE_S)
            except asyncio.TimeoutError:
                process.kill()
            # Let the loop record the final state before answering.
            for _ in range(100):
                current = self.store.get_job(job_id)
                if current is not None and current.state != RUNNING:
                    break
                await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while not self._stopping:
            job = self.store.next_queued()
            if job is None:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 5.0)
                continue
            try:
                await self._run(job.job_id)
            except Exception:
                log.exception("job runner error", extra={"job_id": job.job_id})
                self.store.set_state(job.job_id, FAILED, "internal error in the job runner")
                self.on_event(job.job_id)

    def _command(self, job_dir: JobDir) -> list[str]:
        run = [
            "-m",
            "trainer_service.training.run",
            "--job-dir",
            str(job_dir.path),
            "--artifacts-dir",
            str(self.artifacts_dir),
        ]
        if self.num_processes <= 1:
            return [sys.executable, *run]
        # torchrun starts one process per device (CPU processes talk over gloo); accelerate
        # reads the group from its environment. --standalone picks a free rendezvous port, so
        # data-parallel jobs never collide on one.
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(self.num_processes), *run,
        ]  # fmt: skip

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.split(":", 1)[1]
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def _run(self, job_id: str) -> None:
        job_dir = JobDir(self.jobs_dir / job_id)
        self.store.set_state(job_id, RUNNING)
        self.on_event(job_id)
        with open(job_dir.log, "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *self._command(job_dir), stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env=self._environment(), limit=MAX_EVENT_LINE, start_new_session=True,
            )  # fmt: skip
        self._current = (job_id, process)
        error = ""
        finished = False
        try:
            assert process.stdout is not None
            async for raw in process.stdout:
                event = parse_line(raw.decode(errors="replace"))
                if event is None:
                    continue
                if isinstance(event, Log) and event.level == "error":
                    error = event.message
                finished |= isinstance(event, FinalArtifact)
                self._record(job_id, event)
            code = await process.wait()
        finally:
            self._current = None
        self._finish(job_id, code, finished, error, job_dir)

    def _finish(self, job_id: str, code: int, finished: bool, error: str, job_dir: JobDir) -> None:
        if job_id in self._cancelled:
            self._cancelled.discard(job_id)
            state, reason = CANCELLED, "cancelled by request"
        elif self._stopping and not finished:
            log.info("job paused for shutdown", extra={"job_id": job_id})
            return  # stays RUNNING: resumed from its checkpoint on the next start
        elif code == 0 and finished:
            state, reason = SUCCEEDED, ""
        elif code == EXIT_CANCELLED:
            # Stopped without a cancel request (e.g. the server was killed): resume later.
            state, reason = QUEUED, "training process stopped; resuming from its checkpoint"
        else:
            state, reason = FAILED, error or self._exit_reason(code, job_dir)
        self.store.set_state(job_id, state, reason)
        self.on_event(job_id)

    @staticmethod
    def _exit_reason(code: int, job_dir: JobDir) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return f"training process was killed by {name}{hint}"
        tail = job_dir.last_log_line()
        return f"training process exited with code {code}" + (f": {tail}" if tail else "")

    def _record(self, job_id: str, event: JobEvent) -> None:
        """Persist an event; a bundle it reports also becomes an artifact record."""
        if isinstance(event, (Checkpoint, FinalArtifact)):
            final = isinstance(event, FinalArtifact)
            self.store.add_artifact(
                artifact_id=event.artifact_id, job_id=job_id,
                kind="final" if final else "checkpoint", global_step=event.global_step,
                path=event.artifact_id, final=final,
            )  # fmt: skip
        self.store.append_event(job_id, event)
        self.on_event(job_id)
