"""The job database failing under a running trainer, injected into real processes: its
PostgreSQL frozen (SIGSTOP) while the server answers RPCs, then thawed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from loraforge_core.launch import ServerProcess, health_status
from tests.services import Postgres, throwaway_postgres
from tests.test_trainer_service import job_request

pytestmark = pytest.mark.slow


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A cluster of this test's own: freezing the shared one would stall other tests."""
    with throwaway_postgres() as server:
        yield server


def postgres_tree(server: Postgres) -> list[psutil.Process]:
    postmaster = psutil.Process(int((server.data / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def test_a_frozen_database_makes_calls_unavailable_while_health_and_the_server_go_on(
    tiny_model: Path, tmp_path: Path, own_postgres: Postgres
) -> None:
    trainer = ServerProcess(
        "trainer", data_dir=tmp_path, model=str(tiny_model),
        extra_args=["--database-url", own_postgres.new_database(), "--max-jobs", "0"],
    )  # fmt: skip
    with trainer, grpc.insecure_channel(trainer.target) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        job = stub.CreateJob(job_request("frozen-db"), timeout=60)
        frozen = postgres_tree(own_postgres)
        for process in frozen:
            process.suspend()
        try:
            for call in (
                lambda: stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=60),
                lambda: stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=60),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                assert "job database did not answer" in refused.value.details()
            # Calls into the database wait in threads; the server itself answers.
            assert (
                health_status(trainer.target, timeout=5) == health_pb2.HealthCheckResponse.SERVING
            )
        finally:
            for process in frozen:
                process.resume()
        again = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=60)
        assert again.state == trainer_pb2.JOB_STATE_QUEUED
