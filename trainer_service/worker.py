"""Runs queued jobs, up to ``max_jobs`` at once, each in its own training process.

Long because: one ``JobRunner`` owns a job's whole life on a replica (claim, lease and its
watchdog, the child process, its events and their store writes, the artifact store's copies,
retention), and each of those steps reads the same per-job state (``RunningJob``); split, the
lease rules (fenced writes, stop before the lease lapses) would be spread over modules.

A child process per job means a cancel is a clean stop, a crash or OOM fails only the job, and
GPU memory is returned. The child reports events (events.py) as JSON lines on stdout; this module
turns them into persisted job events and artifact records. A job this replica was running when
it died is queued again at its next start, and its new process resumes from the last
checkpoint.

Each concurrent job has a slot; on a GPU machine a slot owns ``num_processes`` GPUs of its own
(``CUDA_VISIBLE_DEVICES``). ``max_jobs=0`` runs nothing: the replica only answers RPCs.

Jobs are claimed from the shared store under a lease (job_store.py) that a heartbeat renews every
``lease_s / 3``; the heartbeat also carries a cancel asked on another replica. A replica that
finds its lease gone (another replica took the job), or no longer certainly held (the database
away past LEASE_MARGIN), kills the job's process and writes nothing more for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge_core import objectstore
from loraforge_core.artifacts import bundle_key, fetch_bundle, publish_bundle
from loraforge_core.logs import REQUEST_ID, REQUEST_ID_ENV
from loraforge_core.objectstore import ObjectStore
from loraforge_core.settings import LEASE_SECONDS
from trainer_service import metrics
from trainer_service.database import unreachable
from trainer_service.events import Checkpoint, FinalArtifact, JobEvent, Log, Progress, parse_line
from trainer_service.job_store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobStore,
    Lease,
    LeaseLost,
)  # fmt: skip
from trainer_service.jobdir import JobDir
from trainer_service.training.run import EXIT_CANCELLED
from trainer_service.training.zygote import ForkedProcess, Zygote

log = logging.getLogger("loraforge.trainer.worker")

CANCEL_GRACE_S = 30.0
MAX_EVENT_LINE = 64 * 1024 * 1024
IDLE_POLL_S = 5.0  # also how soon an expired lease is noticed when nothing wakes the loop


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


# A job's training process runs only while its lease is certainly held by this replica's own
# monotonic clock: until the start of its last successful renewal (or claim) plus the lease
# less this share of it. A database away longer stops the process before the lease could
# lapse, so the claim after the outage, by whichever replica, is the job's only runner.
LEASE_MARGIN = 1 / 6
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0)  # then 2 s apart, while the lease lasts


@dataclass
class RunningJob:
    slot: int
    lease: Lease  # every write for the job carries it (job_store.Lease)
    held_until: float = 0.0  # time.monotonic(): the lease is certainly ours until then
    task: asyncio.Task[None] | None = None
    process: asyncio.subprocess.Process | ForkedProcess | None = None
    lost: bool = False  # another replica took the job: write nothing more
    progress: Progress | None = None  # the latest, for the metrics


class JobRunner:
    def __init__(
        self,
        job_store: JobStore,
        jobs_dir: Path,
        artifacts_dir: Path,
        objects: ObjectStore | None = None,
        *,
        max_jobs: int = 1,
        gpus: Sequence[int] = (),
        num_processes: int = 1,
        replica_id: str = "local",
        lease_s: float = LEASE_SECONDS,
        keep_checkpoints: int = 0,
        preload: bool = True,
        on_event: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.job_store = job_store
        self.jobs_dir = jobs_dir
        self.artifacts_dir = artifacts_dir
        self.objects = objects  # None: nothing to share (tests of the runner alone)
        self.slots = plan_slots(max_jobs, num_processes, gpus)
        self.num_processes = num_processes
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.keep_checkpoints = keep_checkpoints  # 0: every checkpoint stays
        # Single-process jobs fork from a zygote that imported the training stack once.
        self._zygote = Zygote(MAX_EVENT_LINE) if preload and num_processes <= 1 else None
        self.on_event = on_event  # called on the event loop's thread (see _announce)
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()  # stopped, and the last job here has ended
        self._stopping = False
        self._running: dict[str, RunningJob] = {}
        self._cancelled: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Requeue what this replica ran before a crash, then take jobs and keep leases."""
        self._event_loop = asyncio.get_running_loop()
        for job_id in self.job_store.requeue_owned(
            self.replica_id,
            "the server restarted during this job; resuming from its last checkpoint",
        ):
            self.on_event(job_id)
        self._tasks = [
            asyncio.create_task(self._loop(), name="job-runner"),
            asyncio.create_task(self._heartbeat(), name="job-leases"),
        ]

    def wake(self) -> None:
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop taking jobs; stop the running ones at their next step and give them back to
        the queue (this replica or another resumes them from their last checkpoint). Their
        leases are renewed until they have stopped: no other replica takes a job that still
        trains here."""
        self._stopping = True
        self._wakeup.set()
        for running in list(self._running.values()):
            self._signal(running, signal.SIGTERM)
        claiming, heartbeat = self._tasks or (None, None)
        tasks = [r.task for r in self._running.values() if r.task is not None]
        tasks += [claiming] if claiming is not None else []
        _, late = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S) if tasks else ((), ())
        if late:
            for running in list(self._running.values()):
                self._signal(running, signal.SIGKILL)
            await asyncio.wait(late)
        self._drained.set()
        if self._zygote is not None:
            await self._zygote.close()
        if heartbeat is not None:
            await heartbeat

    @staticmethod
    def _signal(running: RunningJob, sig: signal.Signals) -> None:
        if running.process is not None:
            with contextlib.suppress(ProcessLookupError):
                running.process.send_signal(sig)

    # ------------------------------------------------------------------ cancel
    async def cancel(self, job_id: str) -> None:
        """Cancel a queued job now; stop a running one here within one step, or ask the
        replica that runs it (it stops it at its next heartbeat)."""
        job = await asyncio.to_thread(self.job_store.request_cancel, job_id)
        self.on_event(job_id)
        running = self._running.get(job_id)
        if job.state != RUNNING or running is None:
            return
        self._cancelled.add(job_id)
        await self._stop_job(running)

    async def _stop_job(self, running: RunningJob) -> None:
        self._signal(running, signal.SIGTERM)  # a process not started yet sees the mark
        assert running.task is not None
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
            job = None
            claimed_at = time.monotonic()  # before the claim: the lease is at least as recent
            if slot is not None:
                try:
                    job = await asyncio.to_thread(
                        self.job_store.claim_next, self.replica_id, self.lease_s
                    )
                except Exception:  # the database is unreachable: try again after a pause
                    log.exception("claiming a job failed")
            if slot is None or job is None or self._stopping:
                if job is not None:  # claimed while stopping: give it back
                    await asyncio.to_thread(self._give_back, job.job_id, job.lease, "shutting down")
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_S)
                continue
            self.on_event(job.job_id)
            if job.took_over:
                metrics.TAKEOVERS.inc()
            running = RunningJob(slot, job.lease, claimed_at + self._certain_lease_s())
            self._running[job.job_id] = running
            if job.cancel_requested:
                self._cancelled.add(job.job_id)
            # The job's task logs under the request id of the call that created it.
            REQUEST_ID.set(job.request_trace)
            running.task = asyncio.create_task(self._guarded(job.job_id), name=job.job_id)
            REQUEST_ID.set("")

    async def _heartbeat(self) -> None:
        """Renew the leases of the jobs running here, also while a drain stops them; act on
        cancels and lost leases."""
        while not self._drained.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.lease_s / 3)
            for job_id, running in list(self._running.items()):
                started = time.monotonic()
                try:
                    cancel = await asyncio.to_thread(
                        self.job_store.renew, job_id, running.lease, self.lease_s
                    )
                    running.held_until = started + self._certain_lease_s()
                except LeaseLost:
                    log.warning("lease lost: another replica runs the job now",
                                extra={"job_id": job_id})  # fmt: skip
                    running.lost = True
                    self._signal(running, signal.SIGKILL)
                    continue
                except Exception:  # the database is unreachable: try again next beat
                    log.exception("lease renewal failed", extra={"job_id": job_id})
                    continue
                if cancel and job_id not in self._cancelled:
                    self._cancelled.add(job_id)
                    self._signal(running, signal.SIGTERM)

    def _certain_lease_s(self) -> float:
        return self.lease_s * (1 - LEASE_MARGIN)

    async def _stop_before_the_lease_lapses(self, job_id: str, running: RunningJob) -> None:
        """Kill the job's training process once its lease is no longer certainly held (the
        renewals failed: the database is away); the job's next claim resumes it from its last
        recorded checkpoint, and this replica writes nothing more for it."""
        while (left := running.held_until - time.monotonic()) > 0:
            await asyncio.sleep(left)
        if not running.lost:
            running.lost = True
            self._signal(running, signal.SIGKILL)  # before the log line: it says it is done
            log.warning("lease not renewed in time (is the job database away?): stopped the job "
                        "here; its next claim resumes it", extra={"job_id": job_id})  # fmt: skip

    async def _store_write(self, running: RunningJob, call: Callable[..., Any], *args: Any) -> Any:
        """A job-store write for a running job (see ``_retried``)."""
        return await self._retried(running, "job database", unreachable, call, *args)

    async def _retried(
        self, running: RunningJob, store: str, away: Callable[[BaseException], bool],
        call: Callable[..., Any], *args: Any,
    ) -> Any:  # fmt: skip
        """A store call for a running job (a write, or the fetch of its inputs), off the event
        loop, retried while ``store`` is away (as ``away`` tells from the error) and the lease
        still certainly held: a store away for a while delays a job but never fails it. Its
        events wait meanwhile, so their sequence numbers stay gapless."""
        delays = iter(RETRY_DELAYS_S)
        while True:
            if running.lost:
                raise LeaseLost(f"the lease may have lapsed while the {store} was away")
            try:
                return await asyncio.to_thread(call, *args)
            except LeaseLost:
                raise
            except Exception as err:
                if not away(err):
                    raise
                log.warning(f"{store} unreachable; retrying", extra={"error": str(err)})
                await asyncio.sleep(next(delays, RETRY_DELAYS_S[-1]))

    async def _guarded(self, job_id: str) -> None:
        expiry = asyncio.create_task(
            self._stop_before_the_lease_lapses(job_id, self._running[job_id])
        )
        try:
            await self._run(job_id)
        except LeaseLost:
            self._running[job_id].lost = True
            self._signal(self._running[job_id], signal.SIGKILL)
        except Exception:
            log.exception("job runner error", extra={"job_id": job_id})
            with contextlib.suppress(LeaseLost):
                await asyncio.to_thread(
                    self.job_store.set_state, job_id, FAILED, "internal error in the job runner",
                    lease=self._running[job_id].lease,
                )  # fmt: skip
            self.on_event(job_id)
        finally:
            expiry.cancel()
            running = self._running.pop(job_id, None)
            if running is not None and running.process is not None:
                await _kill_and_reap(running.process)
            self._wakeup.set()  # a slot is free

    def _announce(self, job_id: str) -> None:
        """``on_event(job_id)`` on the event loop's thread, from whichever thread this runs on
        (store calls run in worker threads)."""
        try:
            on_loop = asyncio.get_running_loop() is self._event_loop
        except RuntimeError:  # a worker thread
            on_loop = False
        if on_loop or self._event_loop is None:
            self.on_event(job_id)
        else:
            self._event_loop.call_soon_threadsafe(self.on_event, job_id)

    def _give_back(self, job_id: str, lease: Lease, why: str) -> None:
        with contextlib.suppress(LeaseLost):
            self.job_store.set_state(
                job_id, QUEUED, f"replica {self.replica_id} {why}; resuming from the last "
                "checkpoint", lease=lease,
            )  # fmt: skip
        self._announce(job_id)

    def _arguments(self, job_dir: JobDir) -> list[str]:
        return ["--job-dir", str(job_dir.path), "--artifacts-dir", str(self.artifacts_dir)]

    def _command(self, job_dir: JobDir) -> list[str]:
        run = ["-m", "trainer_service.training.run", *self._arguments(job_dir)]
        if self.num_processes <= 1:
            return [sys.executable, *run]
        # torchrun starts one process per device (CPU processes talk over gloo); accelerate
        # reads the group from its environment. --standalone picks a free rendezvous port, so
        # data-parallel jobs never collide on one.
        # The launcher is tethered to the server (each training process ties itself to it).
        return [
            sys.executable, "-m", "trainer_service.training.tethered",
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(self.num_processes), *run,
        ]  # fmt: skip

    def _environment(self, gpus: list[int]) -> dict[str, str]:
        env = dict(os.environ)
        env[REQUEST_ID_ENV] = REQUEST_ID.get()  # the job's task runs under its creator's id
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def _run(self, job_id: str) -> None:
        job_dir = JobDir(self.jobs_dir / job_id)
        running = self._running[job_id]
        if self.objects is not None:  # inputs, checkpoints and bundles another replica stored
            await self._retried(running, "artifact store or job database", _away,
                                self._fetch_job, job_id, job_dir)  # fmt: skip
        env = self._environment(self.slots[running.slot])
        with open(job_dir.log, "ab") as stderr:
            if self._zygote is not None:
                process = await self._zygote.spawn(self._arguments(job_dir), env, stderr.fileno())
            else:
                process = await asyncio.create_subprocess_exec(
                    *self._command(job_dir), stdout=asyncio.subprocess.PIPE, stderr=stderr,
                    env=env, limit=MAX_EVENT_LINE, start_new_session=True,
                )  # fmt: skip
        running.process = process
        if running.lost:  # the lease lapsed while its inputs were fetched
            self._signal(running, signal.SIGKILL)
        elif job_id in self._cancelled or self._stopping:  # asked while it was starting
            self._signal(running, signal.SIGTERM)
        error = ""
        finished = False
        assert process.stdout is not None
        async for raw in process.stdout:
            event = parse_line(raw.decode(errors="replace"))
            if event is None or running.lost:
                continue
            if isinstance(event, Log) and event.level == "error":
                error = event.message
            finished |= isinstance(event, FinalArtifact)
            if isinstance(event, Progress):
                running.progress = event
                metrics.STEPS.inc()
            if isinstance(event, Checkpoint):
                metrics.CHECKPOINT_WRITE_SECONDS.labels("write").observe(event.write_seconds)
            resume_key = ""
            if isinstance(event, (Checkpoint, FinalArtifact)) and self.objects is not None:
                with metrics.CHECKPOINT_WRITE_SECONDS.labels("publish").time():
                    resume_key = await self._retried(running, "artifact store",
                                                     objectstore.unreachable, self._publish,
                                                     job_dir, event, running.lease)  # fmt: skip
            # Off the event loop: a slow or restarting database stalls this job, not the RPCs.
            await self._store_write(running, self._record, job_id, event, running.lease,
                                    resume_key)  # fmt: skip
            if isinstance(event, Checkpoint) and self.keep_checkpoints:
                await self._store_write(running, self._retain, job_id, job_dir, running.lease)
        code = await process.wait()
        if not running.lost:
            await self._store_write(
                running, self._finish, job_id, running.lease, code, finished, error, job_dir
            )

    def _finish(
        self, job_id: str, lease: Lease, code: int, finished: bool, error: str, job_dir: JobDir
    ) -> None:
        if job_id in self._cancelled:
            self._cancelled.discard(job_id)
            state, reason = CANCELLED, "cancelled by request"
        elif self._stopping and not finished:
            log.info("job given back for shutdown", extra={"job_id": job_id})
            self._give_back(job_id, lease, "shut down")
            return
        elif code == 0 and finished:
            state, reason = SUCCEEDED, ""
        elif code == EXIT_CANCELLED:
            # Stopped without a cancel request (e.g. the server was killed): resume later.
            state, reason = QUEUED, "training process stopped; resuming from its checkpoint"
        else:
            state, reason = FAILED, error or self._exit_reason(code, job_dir)
        job = self.job_store.set_state(job_id, state, reason, lease=lease)
        self._announce(job_id)
        if state in TERMINAL and job.started_at is not None and job.finished_at is not None:
            metrics.JOB_DURATION.labels(state).observe(job.finished_at - job.started_at)

    def running_progress(self) -> dict[str, Progress | None]:
        """The jobs training here and their latest progress."""
        return {job_id: r.progress for job_id, r in self._running.items()}

    @staticmethod
    def _exit_reason(code: int, job_dir: JobDir) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return f"training process was killed by {name}{hint}"
        tail = job_dir.last_log_line()
        return f"training process exited with code {code}" + (f": {tail}" if tail else "")

    def _fetch_job(self, job_id: str, job_dir: JobDir) -> None:
        """What a resumed run needs from the artifact store: the job's inputs, the resume
        state its latest checkpoint record names, and the bundle of every checkpoint recorded
        so far (the final artifact may be an earlier checkpoint's, which another replica
        wrote)."""
        assert self.objects is not None
        job_dir.fetch_inputs(self.objects)
        latest = self.job_store.latest_checkpoint(job_id)
        if latest is not None:
            job_dir.fetch_resume_state(self.objects, latest)
        for artifact_id in self.job_store.get_job(job_id).checkpoint_artifact_ids:
            record = self.job_store.get_artifact(artifact_id)
            if record is not None and fetch_bundle(
                self.objects, record.path, self.artifacts_dir / record.path
            ) is None:  # fmt: skip
                raise FileNotFoundError(f"checkpoint {artifact_id} is not in the artifact store")

    def _publish(self, job_dir: JobDir, event: Checkpoint | FinalArtifact, lease: Lease) -> str:
        """A reported bundle (and a checkpoint's resume state, whose key it returns) into the
        artifact store before the job's record names it: what a record names, every replica
        can fetch. Bundles are content-addressed: a stale owner's copy is the same bytes."""
        assert self.objects is not None
        publish_bundle(self.objects, self.artifacts_dir / event.artifact_id)
        if isinstance(event, Checkpoint):
            return job_dir.publish_checkpoint(self.objects, event.global_step, lease.epoch)
        return ""

    def _retain(self, job_id: str, job_dir: JobDir, lease: Lease) -> None:
        """Checkpoint retention, after each checkpoint: the last ``keep_checkpoints`` bundles,
        the best-scoring and the final stay, each with its resume state. Records go first,
        then files: what a record names exists."""
        pruned = self.job_store.prune_checkpoints(job_id, self.keep_checkpoints, lease=lease)
        try:
            for record in pruned:
                if self.objects is not None:
                    self.objects.delete(self.objects.keys(bundle_key(record.artifact_id)))
                shutil.rmtree(self.artifacts_dir / record.path, ignore_errors=True)
                job_dir.drop_resume_state(self.objects, record)
        except Exception:  # the store is slow or away: storage, not the job, pays for it
            log.warning("checkpoint files not deleted; they stay in the store",
                        extra={"job_id": job_id}, exc_info=True)  # fmt: skip

    def _record(self, job_id: str, event: JobEvent, lease: Lease, resume_key: str = "") -> None:
        """Persist an event; a bundle it reports also becomes an artifact record."""
        if isinstance(event, (Checkpoint, FinalArtifact)):
            final = isinstance(event, FinalArtifact)
            self.job_store.add_artifact(
                artifact_id=event.artifact_id, job_id=job_id,
                kind="final" if final else "checkpoint", global_step=event.global_step,
                path=event.artifact_id, final=final, resume_key=resume_key, lease=lease,
            )  # fmt: skip
        self.job_store.append_event(job_id, event, lease=lease)
        self._announce(job_id)


async def _kill_and_reap(process: asyncio.subprocess.Process | ForkedProcess) -> None:
    """A job's training process, once the runner is done with it for any reason: its process
    group (the launcher and every rank it started) killed unless it has exited, then waited
    for, so that nothing trains on unwatched and no zombie is left."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: start_new_session
    await process.wait()


def _away(err: BaseException) -> bool:
    """Whether the job database or the artifact store was away (see ``_retried``)."""
    return unreachable(err) or objectstore.unreachable(err)
