"""The fleet's costs, against the single-machine default measured in the same run:

- claim latency: a job's QUEUED event to its RUNNING event (the replica woke, claimed it
  under a row lock, and recorded it), on PostgreSQL vs SQLite;
- event latency across replicas: an event's record time on the replica that runs the job to
  its arrival at a watcher on another replica (LISTEN/NOTIFY), vs a watcher on the same one;
- adapter load by bundle id: from S3 into the generator's cache the first time (fetch, sha256,
  load) and from that cache the second time, vs a load from the data dir.

Real servers: PostgreSQL and SeaweedFS as the tests run them (tests/services.py).

    python -m bench.fleet [--jobs 5] [--bundles 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from bench.common import report
from loraforge_core.artifacts import publish_bundle
from loraforge_core.launch import ServerProcess
from loraforge_core.models import resolve_model
from loraforge_core.objectstore import open_object_store
from tests.helpers import shape_png
from tests.services import Postgres, SeaweedS3, running
from trainer_service.training.lora import random_lora_bundle


def job_request(steps: int) -> trainer_pb2.CreateJobRequest:
    """A PTI job of ``steps`` steps per phase, checkpointed twice per phase at most."""
    return trainer_pb2.CreateJobRequest(
        method=trainer_pb2.TRAINING_METHOD_PTI, placeholder_tokens=["<s1>"],
        initializer_tokens=["circle"],
        instance_images=[trainer_pb2.InstanceImage(data=shape_png(), filename="a.png")],
        config=trainer_pb2.TrainingConfig(max_train_steps_ti=steps, max_train_steps_tuning=steps,
                                          save_steps=max(1, steps // 2), seed=1),
    )  # fmt: skip


def claim_latencies(server: ServerProcess, jobs: int) -> list[float]:
    """Milliseconds from QUEUED to RUNNING, one job at a time (each runs to its end)."""
    request = job_request(steps=1)
    latencies = []
    with grpc.insecure_channel(server.target) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        for _ in range(jobs):
            job_id = stub.CreateJob(request, timeout=30).job_id
            states = [
                e for e in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300)
                if e.WhichOneof("kind") == "state_change"
            ]  # fmt: skip
            queued, running = states[0].time.ToDatetime(), states[1].time.ToDatetime()
            latencies.append((running - queued).total_seconds() * 1000)
    return latencies


def watch_latencies(runner: ServerProcess, watcher: ServerProcess) -> list[float]:
    """Milliseconds from each event's record time to its arrival at a live watcher."""
    request = job_request(steps=20)
    with (
        grpc.insecure_channel(runner.target) as a,
        grpc.insecure_channel(watcher.target) as b,
    ):
        job_id = trainer_pb2_grpc.TrainerStub(a).CreateJob(request, timeout=30).job_id
        latencies = []
        watch = trainer_pb2.WatchJobRequest(job_id=job_id)
        for event in trainer_pb2_grpc.TrainerStub(b).WatchJob(watch, timeout=300):
            arrived = time.time()
            if event.sequence > 1:  # the first was recorded before the watch began
                recorded = event.time.seconds + event.time.nanos / 1e9
                latencies.append((arrived - recorded) * 1000)
    return latencies


def load_times(server: ServerProcess, uris: list[str]) -> tuple[list[float], list[float]]:
    """Milliseconds of LoadAdapter by uri: the first load of each, then the second."""
    first, second = [], []
    with grpc.insecure_channel(server.target) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for uri in uris:
            for times in (first, second):
                started = time.perf_counter()
                stub.LoadAdapter(generator_pb2.LoadAdapterRequest(adapter_id="b", uri=uri))
                times.append((time.perf_counter() - started) * 1000)
                stub.UnloadAdapter(generator_pb2.UnloadAdapterRequest(adapter_id="b"))
    return first, second


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--bundles", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    model = resolve_model("")
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    pg_root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    rows: list[tuple[str, float, str]] = []
    with running(Postgres(pg_root)) as pg, running(SeaweedS3(work / "s3")) as s3:
        url = f"s3://{s3.bucket}/bench"
        with ServerProcess("trainer", data_dir=work / "sqlite") as alone:
            sqlite = claim_latencies(alone, args.jobs)
        with ServerProcess(
            "trainer", data_dir=work / "pg", env=s3.env,
            extra_args=["--database-url", pg.new_database(), "--artifact-store", url],
        ) as replica:  # fmt: skip
            fleet = claim_latencies(replica, args.jobs)
        database = pg.new_database()
        fleet_args = ["--database-url", database, "--artifact-store", url]
        with (
            ServerProcess("trainer", data_dir=work / "a", env=s3.env, extra_args=fleet_args)
            as a,
            ServerProcess("trainer", data_dir=work / "b", env=s3.env,
                          extra_args=[*fleet_args, "--max-jobs", "0"]) as b,
        ):  # fmt: skip
            same = watch_latencies(a, a)
            across = watch_latencies(a, b)
        rows += [
            ("event to watcher, same replica, median", statistics.median(same), "ms"),
            ("event to watcher, other replica, median", statistics.median(across), "ms"),
            ("event to watcher, other replica, max", max(across), "ms"),
        ]
        rows += [
            ("claim latency, SQLite (one machine), median", statistics.median(sqlite), "ms"),
            ("claim latency, PostgreSQL + S3 (fleet), median", statistics.median(fleet), "ms"),
            ("  fleet / one machine", statistics.median(fleet) / statistics.median(sqlite), "x"),
        ]
        bundles = [
            random_lora_bundle(model, work / "g-local" / "artifacts", seed=i)
            for i in range(args.bundles)
        ]
        import os

        os.environ.update(s3.env)  # this process publishes to the store
        store = open_object_store(url, work)
        for bundle in bundles:
            publish_bundle(store, bundle.path)
        ids = [b.id for b in bundles]
        with ServerProcess("generator", data_dir=work / "g-local") as local:
            local_first, _ = load_times(local, ids)
        with ServerProcess("generator", data_dir=work / "g-s3", env=s3.env,
                           extra_args=["--artifact-store", url]) as remote:  # fmt: skip
            cold, cached = load_times(remote, ids)
    base = statistics.median(local_first)
    rows += [
        ("LoadAdapter by id from the data dir, median", base, "ms"),
        ("LoadAdapter by id from S3, first (fetch + verify)", statistics.median(cold), "ms"),
        ("LoadAdapter by id from S3, second (local cache)", statistics.median(cached), "ms"),
        ("  S3 first / data dir", statistics.median(cold) / base, "x"),
        ("  S3 second / data dir", statistics.median(cached) / base, "x"),
    ]
    report("fleet", rows, args.out)


if __name__ == "__main__":
    main()
