"""Faults and load: SIGKILL at random points of a job, a burst of clients against a small
queue, and a drain that finishes what runs and refuses what waits."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from loraforge_core.bundle import read_bundle
from loraforge_core.launch import ServerProcess, health_status
from tests.test_trainer_service import job_request


def kill_tree(server: ServerProcess) -> None:
    """SIGKILL the server and its training process at the same moment (no clean-up at all)."""
    assert server.process is not None
    children = psutil.Process(server.process.pid).children(recursive=True)
    for process in children:
        process.kill()
    server.kill()
    psutil.wait_procs(children, timeout=10)


def freeze_tree(server: ServerProcess) -> list[psutil.Process]:
    """SIGSTOP the server and its descendants (the zygote, the training processes): they hold
    their state and do no work. Returns them, the server first."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        process.suspend()
    return tree


RESUMED = "resumed from checkpoint at step "


@pytest.mark.slow
def test_sigkill_at_random_points_then_the_job_finishes_with_a_gapless_log(
    tiny_model: Path, tmp_path: Path
) -> None:
    rng = random.Random(7)
    port = None
    job_id = ""
    kills = 0
    seen = 0  # the last event sequence watched
    state = trainer_pb2.JOB_STATE_UNSPECIFIED
    for round_ in range(8):
        server = ServerProcess("trainer", data_dir=tmp_path, model=str(tiny_model), port=port)
        port = server.port
        with server, grpc.insecure_channel(server.target) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            if not job_id:
                # save_steps=1: a checkpoint (state file and bundle) is written at every step,
                # so most kills land in or near a checkpoint write.
                job_id = stub.CreateJob(
                    job_request(
                        "faults", max_train_steps_ti=8, max_train_steps_tuning=30, save_steps=1
                    ),
                    timeout=30,
                ).job_id
            if round_ < 4:
                seen = next_checkpoint(stub, job_id, seen)  # this round trained a step
                time.sleep(rng.uniform(0.0, 0.8))  # then a random point of the next steps
                kill_tree(server)
                kills += 1
                continue
            events = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300))
            job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id))
            state = job.state
            break
    assert kills == 4
    assert state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert_resumed_from_checkpoints(events, total_steps=38, kills=kills)
    bundle = read_bundle(tmp_path / "artifacts" / job.final_artifact_id)  # verifies sha256
    assert bundle.manifest.global_step == 38


def next_checkpoint(stub: trainer_pb2_grpc.TrainerStub, job_id: str, after: int) -> int:
    """Wait for the job's next checkpoint event after sequence ``after``; its sequence."""
    stream = stub.WatchJob(
        trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=120
    )
    try:
        for event in stream:
            if event.WhichOneof("kind") == "checkpoint":
                return event.sequence
    finally:
        stream.cancel()
    raise AssertionError("the job ended before a checkpoint")


def assert_resumed_from_checkpoints(events: list, *, total_steps: int, kills: int) -> None:
    """The training process said it resumed from a checkpoint, the next step it ran is the one
    after that checkpoint, and the steps run in all are the total plus at most the one or
    two in flight at each kill (a restart from zero would repeat every step done so far)."""
    resumed_at: int | None = None  # the checkpoint of the latest resume, until its first step
    resumes = 0
    for event in events:
        kind = event.WhichOneof("kind")
        if kind == "log" and event.log.message.startswith(RESUMED):
            resumes += 1
            resumed_at = int(event.log.message.removeprefix(RESUMED))
        elif kind == "progress" and resumed_at is not None:
            assert event.progress.global_step == resumed_at + 1, (resumed_at, event.progress)
            resumed_at = None
    assert resumes >= 1, "no restart resumed from a checkpoint"
    steps_run = sum(e.WhichOneof("kind") == "progress" for e in events)
    assert total_steps <= steps_run <= total_steps + 2 * kills, steps_run


@pytest.mark.slow
def test_a_burst_of_64_clients_against_a_queue_of_16(tiny_model: Path, tmp_path: Path) -> None:
    with (
        ServerProcess(
            "generator", data_dir=tmp_path, model=str(tiny_model), extra_args=["--queue-size", "16"]
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        request = generator_pb2.GenerateRequest(
            prompt="a red circle", width=32, height=32, num_inference_steps=4, seed=0
        )

        def call(_: int) -> tuple[str, float]:
            started = time.monotonic()
            try:
                stub.Generate(request, timeout=120)
                return "image", time.monotonic() - started
            except grpc.RpcError as err:
                return err.code().name, time.monotonic() - started

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(call, range(64)))
        outcomes = {name for name, _ in results}
        assert outcomes <= {"image", "RESOURCE_EXHAUSTED"}, outcomes
        images = sum(1 for name, _ in results if name == "image")
        refused = [t for name, t in results if name == "RESOURCE_EXHAUSTED"]
        assert images >= 16 and refused, (images, len(refused))
        assert max(refused) < 5.0, "refusals are quick, not queued"
        assert health_status(server.target) == 1
        print(
            f"burst of 64: {images} images, {len(refused)} RESOURCE_EXHAUSTED, "
            f"slowest refusal {max(refused) * 1000:.0f} ms"
        )


@pytest.mark.slow
@pytest.mark.parametrize("grace", [20])
def test_drain_finishes_running_work_and_refuses_queued(tiny_model, tmp_path, grace) -> None:
    server = (
        ServerProcess(
            "generator",
            data_dir=tmp_path,
            model=str(tiny_model),
            extra_args=["--grace-period", str(grace)],
        )
        .start()
        .wait_serving()
    )
    results: dict[int, str] = {}
    with grpc.insecure_channel(server.target) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        slow = generator_pb2.GenerateRequest(
            prompt="a red circle", width=64, height=64, num_inference_steps=60, seed=0
        )

        running = threading.Event()

        def run_first() -> None:
            try:
                for message in stub.GenerateStream(slow, timeout=120):
                    running.set()  # the first progress: this request is being denoised
                    if message.WhichOneof("kind") == "image":
                        results[0] = "image"
            except grpc.RpcError as err:
                results[0] = err.code().name

        first = threading.Thread(target=run_first)
        first.start()
        assert running.wait(120)
        queued = [stub.Generate.future(slow, timeout=120) for _ in range(2)]
        # Sent after them on the same connection: when it is answered, they have arrived
        # (and queued behind the running request).
        stub.ListAdapters(generator_pb2.ListAdaptersRequest(), timeout=60)
        server.terminate(timeout=grace + 30)
        first.join()
        for i, future in enumerate(queued, start=1):
            error = future.exception()
            results[i] = error.code().name if error is not None else "image"
    assert sorted(results.values()) == ["UNAVAILABLE", "UNAVAILABLE", "image"], results


@pytest.mark.slow
def test_a_killed_server_takes_its_data_parallel_training_processes_with_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    server = ServerProcess(
        "trainer", data_dir=tmp_path, model=str(tiny_model), extra_args=["--num-processes", "2"]
    )
    with server, grpc.insecure_channel(server.target) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        job = stub.CreateJob(job_request(max_train_steps_tuning=100_000), timeout=30)
        for event in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
            if event.WhichOneof("kind") == "progress":  # both ranks are training
                break
        assert server.process is not None
        training = psutil.Process(server.process.pid).children(recursive=True)
        assert len(training) >= 3, training  # the launcher and two ranks
        server.kill()  # the server alone: nothing tells its children to stop
        _, alive = psutil.wait_procs(training, timeout=120)
        for process in alive:
            process.kill()
        assert not alive, [p.cmdline()[:4] for p in alive]
