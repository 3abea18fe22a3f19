"""SIGTERM (a drain: a pod deleted, a node drained) to the replica that trains a job, on a
two-replica fleet: the job goes back to the queue once its training process has stopped, the
other replica resumes it from its last checkpoint, and at no moment do two training processes
run it; it ends SUCCEEDED with a gapless log, nothing is left behind, and new jobs still run."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from loraforge.v1 import trainer_pb2

from tests.chaos.common import TrainingProcesses, assert_ran_once_and_finished, start_long_job
from tests.test_fleet import QUICK, Fleet, stub, watch
from tests.test_trainer_service import job_request

pytestmark = pytest.mark.slow


def test_a_drained_replica_hands_its_job_over_whole(
    tiny_model: Path, tmp_path: Path, postgres_server, s3_url: str, s3_server
) -> None:
    fleet = Fleet(tiny_model, tmp_path, postgres_server.new_database(), s3_url, s3_server.env)
    with ExitStack() as stack:
        a_server = stack.enter_context(fleet.trainer("a"))
        a = stub(a_server, stack)
        job_id, _ = start_long_job(a, tuning_steps=200)
        b = stub(stack.enter_context(fleet.trainer("b")), stack)
        with TrainingProcesses(job_id) as processes:
            assert a_server.terminate() == 0  # the drain: SIGTERM, and a clean exit
            events = watch(b, job_id)
            job = b.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
        after = b.CreateJob(job_request(**QUICK), timeout=30).job_id
        watch(b, after)
        later = b.GetJob(trainer_pb2.GetJobRequest(job_id=after), timeout=60)
    assert_ran_once_and_finished(job, events, processes)
    running_on = [e.state_change.reason for e in events if e.WhichOneof("kind") == "state_change"
                  and e.state_change.state == trainer_pb2.JOB_STATE_RUNNING]  # fmt: skip
    assert running_on == ["on replica a", "on replica b"], running_on
    resumed = [e.log.message for e in events if e.WhichOneof("kind") == "log"
               and "resumed from checkpoint at step" in e.log.message]  # fmt: skip
    assert resumed, "b resumed from a's checkpoint, not from the start"
    assert later.state == trainer_pb2.JOB_STATE_SUCCEEDED  # new jobs still run
