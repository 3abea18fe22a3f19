"""Takeover time after SIGKILL: two replicas share one long job; the one that runs it is
SIGKILLed with its training process (no clean-up at all), and the time from the kill to the
other replica's claim (its "resumes the job" event) is measured, then the killed one restarts
under its own id and waits its turn. Repeated ``--takeovers`` times, alternating.

The bound: the lease expires at most ``--lease`` seconds after the kill (it was renewed
before), and the other replica's runner looks at the queue at least every 5 s
(trainer_service.worker.IDLE_POLL_S) when nothing wakes it; so lease + 5 s.

Real servers: PostgreSQL and SeaweedFS as the tests run them (tests/services.py).

    python -m bench.takeover [--takeovers 10] [--lease 6] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from bench.common import report
from bench.fleet import job_request
from loraforge_core.launch import ServerProcess
from tests.services import Postgres, SeaweedS3, running
from tests.test_faults_and_load import kill_tree
from trainer_service.worker import IDLE_POLL_S


def next_takeover(
    stub: trainer_pb2_grpc.TrainerStub, job_id: str, after: int
) -> tuple[str, float, int]:
    """The next claim of the job after event ``after``: (replica, its time, its sequence)."""
    request = trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after)
    for event in stub.WatchJob(request, timeout=600):
        message = event.log.message if event.WhichOneof("kind") == "log" else ""
        if "stopped renewing its lease; replica" in message:
            replica = message.split("; replica ")[1].split()[0]
            return replica, event.time.ToDatetime().timestamp(), event.sequence
    raise RuntimeError("the job ended before it was taken over")


def first_progress(stub: trainer_pb2_grpc.TrainerStub, job_id: str, after: int) -> int:
    """The sequence of the job's next progress event (its owner trains it)."""
    request = trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after)
    for event in stub.WatchJob(request, timeout=600):
        if event.WhichOneof("kind") == "progress":
            return event.sequence
    raise RuntimeError("the job ended")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takeovers", type=int, default=10)
    parser.add_argument("--lease", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-takeover-"))
    pg_root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    times: list[float] = []
    with running(Postgres(pg_root)) as pg, running(SeaweedS3(work / "s3")) as s3:
        fleet_args = ["--database-url", pg.new_database(), "--artifact-store",
                      f"s3://{s3.bucket}/takeover", "--lease-seconds", str(args.lease)]  # fmt: skip
        servers = {
            name: ServerProcess("trainer", data_dir=work / name, env=s3.env,
                                extra_args=[*fleet_args, "--replica-id", name]).start()
            for name in ("a", "b")
        }  # fmt: skip
        for server in servers.values():
            server.wait_serving()
        try:
            with grpc.insecure_channel(servers["a"].target) as channel:
                stub = trainer_pb2_grpc.TrainerStub(channel)
                job_id = stub.CreateJob(job_request(steps=2048), timeout=30).job_id
                states = trainer_pb2.WatchJobRequest(job_id=job_id)
                owner, after = "", 0
                for event in stub.WatchJob(states, timeout=300):
                    if event.WhichOneof("kind") == "state_change" and event.state_change.reason:
                        owner, after = event.state_change.reason.split()[-1], event.sequence
                        break
            for _ in range(args.takeovers):
                other = "b" if owner == "a" else "a"
                with grpc.insecure_channel(servers[other].target) as channel:
                    stub = trainer_pb2_grpc.TrainerStub(channel)
                    after = first_progress(stub, job_id, after)  # the owner trains it
                    killed_at = time.time()
                    kill_tree(servers[owner])
                    owner, claimed_at, after = next_takeover(stub, job_id, after)
                times.append(claimed_at - killed_at)
                print(f"takeover by {owner}: {times[-1]:.2f} s after the kill", flush=True)
                killed = "b" if owner == "a" else "a"
                servers[killed] = ServerProcess(
                    "trainer", data_dir=work / killed, env=s3.env, port=servers[killed].port,
                    extra_args=[*fleet_args, "--replica-id", killed],
                ).start().wait_serving()  # fmt: skip
        finally:
            for server in servers.values():
                server.terminate()
    rows = [
        (f"takeover after SIGKILL, worst of {len(times)}", max(times), "s"),
        ("takeover after SIGKILL, median", statistics.median(times), "s"),
        ("bound: lease + the idle poll", args.lease + IDLE_POLL_S, "s"),
        ("  worst / bound", max(times) / (args.lease + IDLE_POLL_S), "x"),
    ]
    report("takeover", rows, args.out)


if __name__ == "__main__":
    main()
