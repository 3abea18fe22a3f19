"""The job runner's own faults, injected into a real runner with a real training process:
whatever ends the runner's work on a job, its training process is killed and reaped."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import shape_png
from trainer_service.config import TrainingConfig
from trainer_service.database import SqliteDatabase, migrate
from trainer_service.events import JobEvent, Progress
from trainer_service.job_store import FAILED, JobStore
from trainer_service.jobdir import ImageUpload
from trainer_service.jobs import JobSpec, create_job
from trainer_service.worker import JobRunner


class StoreThatFailsMidJob(JobStore):
    """A job store whose third progress event raises: a bug in the runner's own path."""

    def append_event(self, job_id: str, event: JobEvent, *, owner: str = "") -> int:
        if isinstance(event, Progress) and event.global_step >= 3:
            raise RuntimeError("injected: the runner failed to record an event")
        return super().append_event(job_id, event, owner=owner)


@pytest.mark.slow
def test_an_error_in_the_runner_fails_the_job_and_kills_and_reaps_its_process(
    tiny_model: Path, tmp_path: Path
) -> None:
    db = SqliteDatabase(tmp_path / "jobs.sqlite3")
    migrate(db)
    store = StoreThatFailsMidJob(db)
    # Long enough that a process left alive would still be training (and, its events unread,
    # blocked on a full pipe) long after the runner gave up on it.
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), method="dreambooth_lora",
        instance_prompt="a sks circle", max_train_steps_ti=0, max_train_steps_tuning=10_000,
        save_steps=1000, seed=0, device="cpu",
    )  # fmt: skip
    spec = JobSpec("orphan", config, [ImageUpload(shape_png("red"), "red.png")])
    job, _ = create_job(store, tmp_path / "jobs", spec)
    pid = asyncio.run(_run_until_the_runner_gives_up(store, tmp_path, job.job_id))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped: not even a zombie is left
    final = store.get_job(job.job_id)
    assert final.state == FAILED and final.failure_reason == "internal error in the job runner"
    db.close()


async def _run_until_the_runner_gives_up(store: JobStore, root: Path, job_id: str) -> int:
    claimed = asyncio.Event()
    runner = JobRunner(store, root / "jobs", root / "artifacts", on_event=lambda _: claimed.set())
    runner.start()
    try:
        while job_id not in runner._running:
            claimed.clear()
            await claimed.wait()
        running = runner._running[job_id]
        assert running.task is not None
        # A hang here is the defect: the runner waiting forever for a process it left running.
        await asyncio.wait_for(asyncio.shield(running.task), timeout=300)
        assert running.process is not None
        assert running.process.returncode == -signal.SIGKILL
        return running.process.pid
    finally:
        await runner.stop()
