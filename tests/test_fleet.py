"""The fleet: trainer replicas sharing one PostgreSQL and one S3 server, and no disk.

Each replica and the generator get data dirs of their own; the only things shared are the
database and the S3 bucket (a real PostgreSQL and a real SeaweedFS).
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from loraforge_core.bundle import read_bundle
from loraforge_core.launch import ServerProcess
from loraforge_core.objectstore import open_object_store
from tests.test_faults_and_load import (
    assert_resumed_from_checkpoints,
    freeze_tree,
    kill_tree,
)
from tests.test_trainer_service import job_request

pytestmark = pytest.mark.slow

LEASE_S = 6
QUICK = dict(max_train_steps_ti=2, max_train_steps_tuning=2, save_steps=2)


class Fleet:
    def __init__(self, tiny_model: Path, root: Path, database_url: str, s3_url: str, env):
        self.tiny_model, self.root = tiny_model, root
        self.database_url, self.s3_url, self.env = database_url, s3_url, env
        self.ports: dict[str, int] = {}

    def trainer(self, replica: str, *extra: str) -> ServerProcess:
        server = ServerProcess(
            "trainer", data_dir=self.root / replica, model=str(self.tiny_model),
            port=self.ports.get(replica), env=self.env,
            extra_args=["--database-url", self.database_url, "--artifact-store", self.s3_url,
                        "--replica-id", replica, "--lease-seconds", str(LEASE_S), *extra],
        )  # fmt: skip
        self.ports[replica] = server.port
        return server

    def generator(self, name: str) -> ServerProcess:
        return ServerProcess(
            "generator", data_dir=self.root / name, model=str(self.tiny_model), env=self.env,
            extra_args=["--artifact-store", self.s3_url],
        )  # fmt: skip


@pytest.fixture
def fleet(tiny_model: Path, tmp_path: Path, postgres_server, s3_url: str, s3_server) -> Fleet:
    return Fleet(tiny_model, tmp_path, postgres_server.new_database(), s3_url, s3_server.env)


def stub(server: ServerProcess, stack: ExitStack) -> trainer_pb2_grpc.TrainerStub:
    return trainer_pb2_grpc.TrainerStub(stack.enter_context(grpc.insecure_channel(server.target)))


def watch(trainer: trainer_pb2_grpc.TrainerStub, job_id: str, after: int = 0) -> list:
    request = trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after)
    return list(trainer.WatchJob(request, timeout=600))


def replica_that_ran(events: list) -> list[str]:
    return [
        e.state_change.reason.removeprefix("on replica ")
        for e in events
        if e.WhichOneof("kind") == "state_change"
        and e.state_change.state == trainer_pb2.JOB_STATE_RUNNING
    ]


def test_jobs_created_on_one_replica_run_once_each_across_both(fleet: Fleet) -> None:
    with ExitStack() as stack:
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        b = stub(stack.enter_context(fleet.trainer("b")), stack)
        # Distinct seeds: a seed decides a run, and equal runs make one (content-addressed) bundle.
        ids = [a.CreateJob(job_request(**QUICK, seed=i), timeout=30).job_id for i in range(6)]
        ran = {}
        for job_id in ids:  # every job's events, from the replica that did not take them
            events = watch(b, job_id)
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert events[-1].state_change.state == trainer_pb2.JOB_STATE_SUCCEEDED
            (ran[job_id],) = replica_that_ran(events)  # claimed once
        jobs = [b.GetJob(trainer_pb2.GetJobRequest(job_id=i)) for i in ids]
        # b serves a's bundle: it fetches it from S3 (its own disk never had it).
        from_a = next(j for j in jobs if ran[j.job_id] == "a").final_artifact_id
        assert not (fleet.root / "b" / "artifacts" / from_a).exists()
        archive = b"".join(c.data for c in b.DownloadArtifact(
            trainer_pb2.DownloadArtifactRequest(artifact_id=from_a), timeout=60))  # fmt: skip
    assert set(ran.values()) == {"a", "b"}, ran  # both replicas trained
    assert all(j.final_artifact_id for j in jobs)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(fleet.root / "download", filter="data")
    assert read_bundle(fleet.root / "download").id == from_a  # whole, sha256 verified


def test_a_killed_replicas_job_resumes_on_another_and_after_both_die(fleet: Fleet) -> None:
    tuning = dict(max_train_steps_ti=4, max_train_steps_tuning=40, save_steps=4)
    with ExitStack() as stack:
        a_server = stack.enter_context(fleet.trainer("a"))
        a = stub(a_server, stack)
        job_id = a.CreateJob(job_request(**tuning), timeout=30).job_id
        last = 0
        for event in a.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300):
            last = event.sequence
            if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.global_step >= 8:
                break  # in the tuning phase, past a checkpoint
        # a stands still while b starts (seconds, on a busy machine), so it cannot finish
        # the job first; b was started after a took the job.
        freeze_tree(a_server)
        stopped_at = time.time()  # a renews its lease no more
        b_server = stack.enter_context(fleet.trainer("b"))
        b = stub(b_server, stack)
        kill_tree(a_server)
        seen = []
        for event in b.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=last)):
            seen.append(event)
            if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.global_step >= 24:
                break  # b resumed and got further: now both die
        takeover = next(e for e in seen if "resumes the job" in e.log.message)
        after = takeover.time.ToDatetime().timestamp() - stopped_at
        print(f"takeover {after:.1f} s after a stopped")
        kill_tree(b_server)
    with ExitStack() as stack:  # a comes back (same replica id): b's lease runs out, a resumes
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        events = watch(a, job_id)
        job = a.GetJob(trainer_pb2.GetJobRequest(job_id=job_id))
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gaps
    assert_resumed_from_checkpoints(events, total_steps=44, kills=2)
    messages = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert any("replica a stopped renewing its lease; replica b resumes" in m for m in messages)
    assert any("replica b stopped renewing its lease; replica a resumes" in m for m in messages)
    # Each claim (a, b, a again) wrote its resume states under a key of its own.
    stored = open_object_store(fleet.s3_url, fleet.root).keys(f"jobs/{job_id}/checkpoints/")
    assert {key.split("/")[3] for key in stored} == {"claim-1", "claim-2", "claim-3"}, stored


def test_one_request_id_on_both_replicas_at_once_is_one_job(fleet: Fleet) -> None:
    with ExitStack() as stack:
        stubs = [stub(stack.enter_context(fleet.trainer(r, "--max-jobs", "0")), stack)
                 for r in ("a", "b")]  # fmt: skip
        start = threading.Barrier(8)

        def create(i: int) -> str:
            start.wait()
            return stubs[i % 2].CreateJob(job_request("same-request"), timeout=30).job_id

        with ThreadPoolExecutor(8) as pool:
            ids = set(pool.map(create, range(8)))
        assert len(ids) == 1
        listed = stubs[1].ListJobs(trainer_pb2.ListJobsRequest()).jobs
        assert [j.job_id for j in listed] == list(ids)


def test_a_generator_without_the_trainers_disk_loads_an_artifact_by_id(fleet: Fleet) -> None:
    with ExitStack() as stack:
        trainer = stub(stack.enter_context(fleet.trainer("a")), stack)
        job_id = trainer.CreateJob(job_request(**QUICK), timeout=30).job_id
        watch(trainer, job_id)
        artifact_id = trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job_id)).final_artifact_id
        server = stack.enter_context(fleet.generator("g"))
        generator = generator_pb2_grpc.GeneratorStub(
            stack.enter_context(grpc.insecure_channel(server.target))
        )
        load = generator_pb2.LoadAdapterRequest(adapter_id="trained", uri=artifact_id)
        for _ in range(2):  # the second load comes from the generator's own disk
            generator.LoadAdapter(load, timeout=120)
            reply = generator.Generate(generator_pb2.GenerateRequest(
                prompt="a photo of a <s1>", width=32, height=32, num_inference_steps=3, seed=1,
                adapters=[generator_pb2.AdapterRef(adapter_id="trained", scale=1.0)],
            ), timeout=120)  # fmt: skip
            assert reply.images[0].data.startswith(b"\x89PNG")
            generator.UnloadAdapter(generator_pb2.UnloadAdapterRequest(adapter_id="trained"))
        fetched = server.log().count("bundle fetched from the artifact store")
    assert fetched == 1
    assert not (fleet.root / "g" / "jobs").exists()  # nothing of the trainer's on its disk


def test_retention_keeps_the_last_checkpoints_in_the_store_and_on_disk(fleet: Fleet) -> None:
    with ExitStack() as stack:
        trainer = stub(stack.enter_context(fleet.trainer("a", "--keep-checkpoints", "2")), stack)
        request = job_request(max_train_steps_ti=2, max_train_steps_tuning=8, save_steps=2)
        job_id = trainer.CreateJob(request, timeout=30).job_id
        events = watch(trainer, job_id)
        job = trainer.GetJob(trainer_pb2.GetJobRequest(job_id=job_id))
        checkpoints = [
            e.checkpoint.artifact_id for e in events if e.WhichOneof("kind") == "checkpoint"
        ]
        assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED and len(checkpoints) == 5
        kept = {*checkpoints[-2:], job.final_artifact_id}
        for pruned in checkpoints[:-2]:
            with pytest.raises(grpc.RpcError) as caught:
                trainer.GetArtifact(trainer_pb2.GetArtifactRequest(artifact_id=pruned))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    store = open_object_store(fleet.s3_url, fleet.root)
    assert {key.split("/")[1] for key in store.keys("artifacts/")} == kept
    stored = store.keys(f"jobs/{job_id}/checkpoints/")
    assert {key.split("/")[3] for key in stored} == {"claim-1"}
    resume_states = [Path(key).name for key in stored]
    assert resume_states == ["step-0000008.pt", "step-0000010.pt"]
    local = fleet.root / "a"
    assert {p.name for p in (local / "artifacts").iterdir() if not p.name.startswith(".")} == kept
    assert (
        sorted(p.name for p in (local / "jobs" / job_id / "checkpoints").iterdir()) == resume_states
    )


def test_a_cancel_on_one_replica_stops_the_job_where_it_runs(fleet: Fleet) -> None:
    with ExitStack() as stack:
        a = stub(stack.enter_context(fleet.trainer("a")), stack)
        b = stub(stack.enter_context(fleet.trainer("b", "--max-jobs", "0")), stack)
        job_id = a.CreateJob(job_request(max_train_steps_tuning=100_000), timeout=30).job_id
        for event in b.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300):
            if event.WhichOneof("kind") == "progress":  # running, on a
                break
        cancelled = b.CancelJob(trainer_pb2.CancelJobRequest(job_id=job_id), timeout=120)
        events = watch(a, job_id)
    assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
    assert replica_that_ran(events) == ["a"]
    assert events[-1].state_change.state == trainer_pb2.JOB_STATE_CANCELLED
