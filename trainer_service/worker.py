"""Runs queued jobs, up to ``max_jobs`` at once, each in its own training process.

A child process per job means a cancel is a clean stop, a crash or OOM fails only the job, and
GPU memory is returned. The child reports events (events.py) as JSON lines on stdout; this module
turns them into persisted job events and artifact records. A job found RUNNING at start-up (the
server died under it) is queued again and its new process resumes from the last checkpoint.

Each concurrent job has a slot; on a GPU machine a slot owns ``num_processes`` GPUs of its own
(``CUDA_VISIBLE_DEVICES``). ``max_jobs=0`` runs nothing: the replica only answers RPCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer_service.events import Checkpoint, FinalArtifact, JobEvent, Log, parse_line
from trainer_service.jobdir import JobDir
from trainer_service.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from trainer_service.training.run import EXIT_CANCELLED, die_with_parent

log = logging.getLogger("loraforge.trainer.worker")

CANCEL_GRACE_S = 30.0
MAX_EVENT_LINE = 64 * 1024 * 1024
IDLE_POLL_S = 5.0


def plan_slots(max_jobs: int, num_processes: int, gpus: Sequence[int]) -> list[list[int]]:
    """The GPUs each concurrent job gets: ``num_processes`` apiece; none on a CPU machine."""
    if not gpus:
        return [[] for _ in range(max_jobs)]
    needed = max_jobs * num_processes
    if needed > len(gpus):
        raise ValueError(
            f"{max_jobs} concurrent job(s) x {num_processes} process(es) need {needed} GPUs; "
            f"this replica sees {len(gpus)}: lower --max-jobs or --num-processes"
        )
    return [list(gpus[i * num_processes : (i + 1) * num_processes]) for i in range(max_jobs)]


@dataclass
class RunningJob:
    slot: int
    task: asyncio.Task[None]
    process: asyncio.subprocess.Process | None = None


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        jobs_dir: Path,
        artifacts_dir: Path,
        *,
        max_jobs: int = 1,
        gpus: Sequence[int] = (),
        num_processes: int = 1,
        on_event: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.store = store
        self.jobs_dir = jobs_dir
        self.artifacts_dir = artifacts_dir
        self.slots = plan_slots(max_jobs, num_processes, gpus)
        self.num_processes = num_processes
        self.on_event = on_event
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._running: dict[str, RunningJob] = {}
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
        """Stop taking jobs; stop the running ones at their next step (they resume on restart)."""
        self._stopping = True
        self._wakeup.set()
        for running in list(self._running.values()):
            self._signal(running, signal.SIGTERM)
        tasks = [r.task for r in self._running.values()]
        if self._task is not None:
            tasks.append(self._task)
        _, late = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S) if tasks else ((), ())
        if late:
            for running in list(self._running.values()):
                self._signal(running, signal.SIGKILL)
            await asyncio.wait(late)

    @staticmethod
    def _signal(running: RunningJob, sig: signal.Signals) -> None:
        if running.process is not None:
            with contextlib.suppress(ProcessLookupError):
                running.process.send_signal(sig)

    # ------------------------------------------------------------------ cancel
    async def cancel(self, job_id: str) -> None:
        """Cancel a queued job now, or stop a running one within one step."""
        job = self.store.get_job(job_id)
        if job is None or job.state not in (QUEUED, RUNNING):
            return
        running = self._running.get(job_id)
        if running is None and job.state == QUEUED:
            self.store.set_state(job_id, CANCELLED, "cancelled by request")
            self.on_event(job_id)
            return
        self._cancelled.add(job_id)
        if running is None:
            return
        self._signal(running, signal.SIGTERM)  # a process not started yet sees the mark
        done, _ = await asyncio.wait([running.task], timeout=CANCEL_GRACE_S)
        if not done:
            self._signal(running, signal.SIGKILL)
            await asyncio.wait([running.task])  # the final state is recorded when it ends

    # ------------------------------------------------------------------ the loop
    def _free_slot(self) -> int | None:
        busy = {r.slot for r in self._running.values()}
        return next((i for i in range(len(self.slots)) if i not in busy), None)

    async def _loop(self) -> None:
        while not self._stopping:
            slot = self._free_slot()
            job = self.store.next_queued() if slot is not None else None
            if slot is None or job is None:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_S)
                continue
            self.store.set_state(job.job_id, RUNNING)
            self.on_event(job.job_id)
            task = asyncio.create_task(self._guarded(job.job_id), name=f"job-{job.job_id}")
            self._running[job.job_id] = RunningJob(slot, task)

    async def _guarded(self, job_id: str) -> None:
        try:
            await self._run(job_id)
        except Exception:
            log.exception("job runner error", extra={"job_id": job_id})
            self.store.set_state(job_id, FAILED, "internal error in the job runner")
            self.on_event(job_id)
        finally:
            self._running.pop(job_id, None)
            self._wakeup.set()  # a slot is free

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

    def _environment(self, gpus: list[int]) -> dict[str, str]:
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def _run(self, job_id: str) -> None:
        job_dir = JobDir(self.jobs_dir / job_id)
        running = self._running[job_id]
        with open(job_dir.log, "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *self._command(job_dir), stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env=self._environment(self.slots[running.slot]), limit=MAX_EVENT_LINE,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        running.process = process
        if job_id in self._cancelled or self._stopping:  # asked while it was starting
            self._signal(running, signal.SIGTERM)
        error = ""
        finished = False
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
