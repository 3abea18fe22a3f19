"""What the job runner makes of a training process's events and exit (no process started)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from trainer_service.events import Checkpoint, FinalArtifact
from trainer_service.job_store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobStore,
    Lease,
    LeaseLost,
)
from trainer_service.jobdir import JobDir
from trainer_service.training.run import EXIT_CANCELLED
from trainer_service.worker import JobRunner, plan_slots


@pytest.fixture
def runner(tmp_path: Path):
    store = JobStore.sqlite(tmp_path / "jobs.sqlite3")
    notified: list[str] = []
    runner = JobRunner(store, tmp_path / "jobs", tmp_path / "artifacts", on_event=notified.append)
    runner.notified = notified  # type: ignore[attr-defined]
    yield runner
    store.close()


def running_job(runner: JobRunner) -> tuple[str, Lease, JobDir]:
    job, _ = runner.job_store.create_job(
        request_id="", method="pti", base_model="tiny", tokens=[], num_images=1, config={}
    )
    claimed = runner.job_store.claim_next(runner.replica_id, 60)
    assert claimed is not None and claimed.state == RUNNING
    job_dir = JobDir(runner.jobs_dir / job.job_id)
    job_dir.path.mkdir(parents=True)
    return job.job_id, claimed.lease, job_dir


def test_reported_bundles_become_artifact_records_and_events(runner) -> None:
    job_id, lease, _ = running_job(runner)
    runner._record(job_id, Checkpoint("ck", 5), lease)
    runner._record(job_id, FinalArtifact("fin", 10), lease)
    job = runner.job_store.get_job(job_id)
    assert job.checkpoint_artifact_ids == ["ck"] and job.final_artifact_id == "fin"
    assert runner.job_store.get_artifact("fin").path == "fin"
    kinds = [r.event.kind for r in runner.job_store.events_after(job_id, 0)]
    assert kinds[-2:] == ["checkpoint", "final_artifact"]
    assert runner.notified == [job_id, job_id]


@pytest.mark.parametrize(
    ("code", "finished", "error", "state", "reason"),
    [
        (0, True, "", SUCCEEDED, ""),
        (EXIT_CANCELLED, False, "", QUEUED, "resuming from its checkpoint"),
        (-signal.SIGKILL, False, "", FAILED, "killed by SIGKILL (out of memory?)"),
        (1, False, "ValueError: bad initializer", FAILED, "ValueError: bad initializer"),
        (1, False, "", FAILED, "exited with code 1: CUDA error: device-side assert"),
        (0, False, "", FAILED, "exited with code 0"),  # ended without its final artifact
    ],
)
def test_the_exit_decides_the_jobs_state(runner, code, finished, error, state, reason) -> None:
    job_id, lease, job_dir = running_job(runner)
    job_dir.log.write_text("loading\nCUDA error: device-side assert\n")
    runner._finish(job_id, lease, code, finished, error, job_dir)
    job = runner.job_store.get_job(job_id)
    assert job.state == state
    last = runner.job_store.events_after(job_id, 0)[-1].event
    assert reason in last.reason


def test_a_cancel_wins_and_a_shutdown_gives_the_job_back_to_the_queue(runner) -> None:
    job_id, lease, job_dir = running_job(runner)
    runner._cancelled.add(job_id)
    runner._finish(job_id, lease, EXIT_CANCELLED, False, "", job_dir)
    assert runner.job_store.get_job(job_id).state == CANCELLED
    job_id, lease, job_dir = running_job(runner)
    runner._stopping = True
    runner._finish(job_id, lease, EXIT_CANCELLED, False, "", job_dir)
    job = runner.job_store.get_job(job_id)
    assert job.state == QUEUED and job.owner == ""  # any replica resumes it now
    assert "replica local shut down" in runner.job_store.events_after(job_id, 0)[-1].event.reason


def test_a_replica_that_lost_its_lease_writes_nothing_more(runner) -> None:
    job_id, lease, job_dir = running_job(runner)
    # The lease runs out and another replica claims the job.
    with runner.job_store.db.transaction() as tx:
        tx.run("UPDATE jobs SET lease_expires_at=0 WHERE job_id=?", (job_id,))
    assert runner.job_store.claim_next("other", 60).owner == "other"
    before = runner.job_store.get_job(job_id).last_sequence
    with pytest.raises(LeaseLost):
        runner._record(job_id, Checkpoint("ck", 5), lease)
    with pytest.raises(LeaseLost):
        runner._finish(job_id, lease, 0, True, "", job_dir)
    job = runner.job_store.get_job(job_id)
    assert job.last_sequence == before and job.state == RUNNING and job.owner == "other"


def test_each_concurrent_job_gets_gpus_of_its_own() -> None:
    assert plan_slots(2, 1, []) == [[], []]  # CPU: no devices to split
    assert plan_slots(2, 2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert plan_slots(0, 1, [0]) == []  # answers RPCs only
    with pytest.raises(ValueError, match="need 4 GPUs; this replica sees 3"):
        plan_slots(2, 2, [0, 1, 2])
