"""The job runner's own faults, injected into a real runner with a real training process:
whatever ends the runner's work on a job, its training process is killed and reaped; a drain
keeps the job's lease until that process has stopped; a job resumed elsewhere finds every
file it needs in the artifact store."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from loraforge_core.bundle import read_bundle
from loraforge_core.objectstore import open_object_store
from tests.helpers import shape_png
from trainer_service.config import TrainingConfig
from trainer_service.database import SqliteDatabase, migrate
from trainer_service.events import JobEvent, Progress
from trainer_service.job_store import FAILED, QUEUED, SUCCEEDED, TERMINAL, JobStore, Lease
from trainer_service.jobdir import ImageUpload
from trainer_service.jobs import JobSpec, create_job
from trainer_service.worker import JobRunner


class StoreThatFailsMidJob(JobStore):
    """A job store whose third progress event raises: a bug in the runner's own path."""

    def append_event(self, job_id: str, event: JobEvent, *, lease: Lease | None = None) -> int:
        if isinstance(event, Progress) and event.global_step >= 3:
            raise RuntimeError("injected: the runner failed to record an event")
        return super().append_event(job_id, event, lease=lease)


class WatchedRunner(JobRunner):
    """The real runner, whose every job change wakes the test (``until``)."""

    def __init__(self, *args, **kwargs) -> None:
        self.changed = asyncio.Event()
        super().__init__(*args, on_event=lambda _: self.changed.set(), **kwargs)

    async def until(self, done: Callable[[], object]) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()


def long_job(tiny_model: Path) -> TrainingConfig:
    """Long enough that a process left alive would still be training (and, its events unread,
    blocked on a full pipe) long after the runner gave up on it."""
    return TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), method="dreambooth_lora",
        instance_prompt="a sks circle", max_train_steps_ti=0, max_train_steps_tuning=10_000,
        save_steps=1000, seed=0, device="cpu",
    )  # fmt: skip


@pytest.mark.slow
def test_an_error_in_the_runner_fails_the_job_and_kills_and_reaps_its_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    db = SqliteDatabase(tmp_path / "jobs.sqlite3")
    migrate(db)
    store = StoreThatFailsMidJob(db)
    spec = JobSpec("orphan", long_job(tiny_model), [ImageUpload(shape_png("red"), "red.png")])
    job, _ = create_job(store, tmp_path / "jobs", spec)
    pid = asyncio.run(_run_until_the_runner_gives_up(store, tmp_path, job.job_id))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped: not even a zombie is left
    final = store.get_job(job.job_id)
    assert final.state == FAILED and final.failure_reason == "internal error in the job runner"
    db.close()


async def _run_until_the_runner_gives_up(store: JobStore, root: Path, job_id: str) -> int:
    runner = WatchedRunner(store, root / "jobs", root / "artifacts")
    runner.start()
    try:
        await runner.until(lambda: job_id in runner._running)
        running = runner._running[job_id]
        assert running.task is not None
        # A hang here is the defect: the runner waiting forever for a process it left running.
        await asyncio.wait_for(asyncio.shield(running.task), timeout=300)
        assert running.process is not None
        assert running.process.returncode == -signal.SIGKILL
        return running.process.pid
    finally:
        await runner.stop()


@pytest.mark.slow
def test_a_draining_runner_keeps_its_lease_until_its_process_has_stopped(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Its training process frozen (a slow stop), a runner draining past its 3 s lease: the
    job stays its own, and is handed back to the queue only once the process has ended."""
    store = JobStore.sqlite(tmp_path / "jobs.sqlite3")
    job, _ = create_job(store, tmp_path / "jobs", JobSpec("drain", long_job(tiny_model), [
        ImageUpload(shape_png("red"), "red.png")]))  # fmt: skip
    asyncio.run(_drain_while_frozen(store, tmp_path, job.job_id))
    final = store.get_job(job.job_id)
    assert final.state == QUEUED and final.owner == ""  # given back, for any replica to resume
    assert store.claim_next("b", 60).job_id == job.job_id
    store.close()


async def _drain_while_frozen(store: JobStore, root: Path, job_id: str) -> None:
    runner = WatchedRunner(store, root / "jobs", root / "artifacts", lease_s=3)
    runner.start()
    await runner.until(lambda: job_id in runner._running and runner._running[job_id].progress)
    process = psutil.Process(runner._running[job_id].process.pid)
    process.suspend()  # it will not stop at its next step: the drain takes its time
    stopping = asyncio.create_task(runner.stop())
    try:
        # Past the lease the draining runner held when it began, by the database's clock: a
        # lease is a time, so this waits on that clock (no event marks a lease lapsing).
        held = store.get_job(job_id).lease_expires_at
        while _database_now(store) < held + 1:
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(store.claim_next, "b", 60) is None
        assert store.get_job(job_id).owner == runner.replica_id
    finally:
        process.resume()  # the SIGTERM it holds now stops it
    await stopping


def _database_now(store: JobStore) -> float:
    with store.db.read() as tx:
        return tx.one(f"SELECT {store.db.now} AS now")["now"]


@pytest.mark.slow
def test_a_job_resumed_on_another_replica_gets_every_checkpoint_bundle_recorded_before(
    tiny_model: Path, tmp_path: Path, s3_url: str
) -> None:
    """Replica a trains to its first checkpoint and drains; replica b, with a disk of its own,
    finishes the job. b holds a's checkpoint bundles, fetched from the artifact store: the
    final artifact may be one of them (select_final best)."""
    objects = open_object_store(s3_url, tmp_path / "unused")
    store = JobStore.sqlite(tmp_path / "jobs.sqlite3")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), method="dreambooth_lora",
        instance_prompt="a sks circle", max_train_steps_ti=0, max_train_steps_tuning=6,
        save_steps=2, seed=0, device="cpu",
    )  # fmt: skip
    job, _ = create_job(store, tmp_path / "a" / "jobs", JobSpec("takeover", config, [
        ImageUpload(shape_png("red"), "red.png")]), objects)  # fmt: skip
    first = asyncio.run(_replica_a_until_its_first_checkpoint(store, objects, tmp_path, job.job_id))
    asyncio.run(_replica_b_to_the_end(store, objects, tmp_path, job.job_id))
    assert store.get_job(job.job_id).state == SUCCEEDED
    assert read_bundle(tmp_path / "b" / "artifacts" / first).id == first
    store.close()


async def _replica_a_until_its_first_checkpoint(store, objects, root: Path, job_id: str) -> str:
    runner = WatchedRunner(store, root / "a" / "jobs", root / "a" / "artifacts", objects)
    runner.start()
    try:
        await runner.until(lambda: store.get_job(job_id).checkpoint_artifact_ids)
    finally:
        await runner.stop()  # the job goes back to the queue at its next step
    return store.get_job(job_id).checkpoint_artifact_ids[0]


async def _replica_b_to_the_end(store, objects, root: Path, job_id: str) -> None:
    runner = WatchedRunner(store, root / "b" / "jobs", root / "b" / "artifacts", objects,
                           replica_id="b")  # fmt: skip
    runner.start()
    try:
        await runner.until(lambda: store.get_job(job_id).state in TERMINAL)
    finally:
        await runner.stop()
