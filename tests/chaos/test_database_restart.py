"""PostgreSQL stopped for 15 s under a two-replica fleet while a job trains, then started
again: the job ends SUCCEEDED with a gapless log, and at no moment (sampled from /proc) do two
training processes run it. The owner stops its process before its lease could lapse unrenewed,
so the claim after the outage, by either replica, is the only runner."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
from loraforge.v1 import trainer_pb2

from tests.services import Postgres, throwaway_postgres
from tests.test_fleet import Fleet, stub, watch
from tests.test_trainer_service import job_request

pytestmark = pytest.mark.slow

OUTAGE_S = 15  # the fault: the database away this long (more than two 6 s leases)


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A cluster of this test's own: stopping the shared one would fail other tests."""
    with throwaway_postgres() as server:
        yield server


class TrainingProcesses:
    """Samples /proc for a job's training processes until stopped; the most seen at once
    (with ``running_only``, not counting frozen ones: SIGSTOP, or zombies)."""

    def __init__(self, job_id: str, *, running_only: bool = False) -> None:
        self.job_id = job_id
        self.running_only = running_only
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> list[int]:
        found = []
        for process in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "trainer_service.training.run" not in cmdline or self.job_id not in cmdline:
                continue
            frozen = process.info["status"] in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
            if not (self.running_only and frozen):
                found.append(process.info["pid"])
        return found

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(self.now()))
            self._stop.wait(0.05)

    def __enter__(self) -> TrainingProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_database_restart_mid_job_runs_it_once_and_finishes_it(
    tiny_model: Path, tmp_path: Path, own_postgres: Postgres, s3_url: str, s3_server
) -> None:
    fleet = Fleet(tiny_model, tmp_path, own_postgres.new_database(), s3_url, s3_server.env)
    with ExitStack() as stack:
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        stack.enter_context(fleet.trainer("b"))
        request = job_request(max_train_steps_ti=4, max_train_steps_tuning=400, save_steps=8)
        job_id = a.CreateJob(request, timeout=30).job_id
        for event in a.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300):
            if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.global_step >= 16:
                break  # in the tuning phase, past a checkpoint
        with TrainingProcesses(job_id) as processes:
            own_postgres.stop()
            time.sleep(OUTAGE_S)  # the fault's length, not a wait for an event
            own_postgres.start_again()
            events = watch(a, job_id)
            job = a.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
    assert processes.most == 1, "two training processes ran the job at once"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gaps
    assert processes.now() == []  # nothing left behind
