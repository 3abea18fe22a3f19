"""The S3 server frozen (SIGSTOP) for 20 s while a two-replica fleet trains a job and uploads
its checkpoints, then thawed: the upload waits and completes, the heartbeat keeps the lease
meanwhile (no takeover), the job ends SUCCEEDED with a gapless log, every checkpoint its log
names is whole in the store, and at no moment do two training processes run the job."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from loraforge.v1 import trainer_pb2

from loraforge_core.artifacts import fetch_bundle
from loraforge_core.objectstore import open_object_store
from tests.chaos.common import TrainingProcesses, assert_ran_once_and_finished, start_long_job
from tests.test_fleet import Fleet, stub, watch

pytestmark = pytest.mark.slow

PAUSE_S = 20  # the fault: the store frozen this long (more than three 6 s leases)


def test_a_frozen_store_delays_checkpoint_uploads_and_loses_nothing(
    tiny_model: Path, tmp_path: Path, postgres_server, s3_url: str, s3_server
) -> None:
    fleet = Fleet(tiny_model, tmp_path, postgres_server.new_database(), s3_url, s3_server.env)
    with ExitStack() as stack:
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        stack.enter_context(fleet.trainer("b"))
        job_id, _ = start_long_job(a, tuning_steps=200)  # its next upload meets the frozen store
        with TrainingProcesses(job_id) as processes:
            os.kill(s3_server.process.pid, signal.SIGSTOP)
            try:
                time.sleep(PAUSE_S)  # the fault's length, not a wait for an event
            finally:
                os.kill(s3_server.process.pid, signal.SIGCONT)
            events = watch(a, job_id)
            job = a.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
    assert_ran_once_and_finished(job, events, processes)
    messages = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert not any("stopped renewing its lease" in m for m in messages)  # never taken over
    store = open_object_store(fleet.s3_url, tmp_path)
    named = [e.checkpoint.artifact_id for e in events if e.WhichOneof("kind") == "checkpoint"]
    for artifact_id in {*named, job.final_artifact_id}:  # whole and verified, each of them
        assert fetch_bundle(store, artifact_id, tmp_path / "check" / artifact_id) is not None
