"""The S3 server killed while a job trains and started again 25 s later (longer than boto's
own retries ride out): the checkpoint upload that meets the outage waits for the store, the
job ends SUCCEEDED with a gapless log, every checkpoint its log names is whole in the store,
and no training process is left."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from loraforge.v1 import trainer_pb2

from loraforge_core.artifacts import fetch_bundle
from loraforge_core.objectstore import open_object_store
from tests.chaos.common import TrainingProcesses, assert_ran_once_and_finished, start_long_job
from tests.services import SeaweedS3, running
from tests.test_fleet import Fleet, stub, watch

pytestmark = pytest.mark.slow

OUTAGE_S = 25  # the fault: the store away this long (boto's 5 attempts give up within ~15 s)


@pytest.fixture
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A store of this test's own: killing the shared one would fail other tests."""
    with running(SeaweedS3(tmp_path_factory.mktemp("own-s3"))) as server:
        yield server


def test_a_store_down_longer_than_its_client_retries_delays_the_job_and_loses_nothing(
    tiny_model: Path,
    tmp_path: Path,
    postgres_server,
    own_s3: SeaweedS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3_url = f"s3://{own_s3.bucket}/outage"
    fleet = Fleet(tiny_model, tmp_path, postgres_server.new_database(), s3_url, own_s3.env)
    with ExitStack() as stack:
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        job_id, _ = start_long_job(a, tuning_steps=200)  # its next upload meets the outage
        with TrainingProcesses(job_id) as processes:
            own_s3.process.kill()
            own_s3.process.wait()
            time.sleep(OUTAGE_S)  # the fault's length, not a wait for an event
            own_s3.start()  # the same port and data
            events = watch(a, job_id)
            job = a.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
    assert_ran_once_and_finished(job, events, processes)
    for name, value in own_s3.env.items():
        monkeypatch.setenv(name, value)
    store = open_object_store(s3_url, tmp_path)
    named = [e.checkpoint.artifact_id for e in events if e.WhichOneof("kind") == "checkpoint"]
    for artifact_id in {*named, job.final_artifact_id}:  # whole and verified, each of them
        assert fetch_bundle(store, artifact_id, tmp_path / "check" / artifact_id) is not None
