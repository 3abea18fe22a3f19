"""PostgreSQL stopped for 15 s under a two-replica fleet while a job trains, then started
again: the job ends SUCCEEDED with a gapless log, and at no moment (sampled from /proc) do two
training processes run it. The owner stops its process before its lease could lapse unrenewed,
so the claim after the outage, by either replica, is the only runner."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from tests.chaos.common import TrainingProcesses, assert_ran_once_and_finished, start_long_job
from tests.services import Postgres, throwaway_postgres
from tests.test_fleet import Fleet, stub, watch

pytestmark = pytest.mark.slow

OUTAGE_S = 15  # the fault: the database away this long (more than two 6 s leases)
CALLERS = 12  # GetJob calls made at once during the outage: more than the server's threads


def get_job_status(trainer: trainer_pb2_grpc.TrainerStub, job_id: str) -> grpc.StatusCode:
    try:
        trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A cluster of this test's own: stopping the shared one would fail other tests."""
    with throwaway_postgres() as server:
        yield server


def test_a_database_restart_mid_job_runs_it_once_and_finishes_it(
    tiny_model: Path, tmp_path: Path, own_postgres: Postgres, s3_url: str, s3_server
) -> None:
    fleet = Fleet(tiny_model, tmp_path, own_postgres.new_database(), s3_url, s3_server.env)
    with ExitStack() as stack:
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        stack.enter_context(fleet.trainer("b"))
        job_id, _ = start_long_job(a, tuning_steps=400)
        with TrainingProcesses(job_id) as processes:
            own_postgres.stop()
            stopped = time.monotonic()
            # Users keep asking meanwhile: each call answers UNAVAILABLE, and none may leave
            # a thread waiting on the database past its answer (the next calls would queue
            # behind it after the restart).
            with ThreadPoolExecutor(CALLERS) as pool:
                for code in pool.map(lambda _: get_job_status(a, job_id), range(CALLERS)):
                    assert code == grpc.StatusCode.UNAVAILABLE, code
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))  # the fault's length
            own_postgres.start_again()
            events = watch(a, job_id)  # answered at once: no retry
            job = a.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
    assert_ran_once_and_finished(job, events, processes)
