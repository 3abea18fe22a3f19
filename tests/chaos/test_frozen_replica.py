"""A replica frozen (SIGSTOP of the server and its training process) past its lease while it
trains, then thawed (SIGCONT) after another replica took the job over: the thawed server kills
its training process before that process runs another step, writes nothing more for the job,
and the job ends SUCCEEDED on the other replica with a gapless log; at no moment do two
unfrozen training processes run the job. The server is frozen at the worst moment: inside a
transaction on the job database, its job's row locked, which no other replica's claim takes
until the database ends the stalled session."""

from __future__ import annotations

import contextlib
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import psycopg
import pytest
from loraforge.v1 import trainer_pb2

from loraforge_core.launch import ServerProcess
from tests.chaos.common import TrainingProcesses, assert_ran_once_and_finished, start_long_job
from tests.test_fleet import Fleet, stub, watch

pytestmark = pytest.mark.slow

STOPPED_IN_TIME = "lease not renewed in time"


def alive(process: psutil.Process) -> bool:
    """Running or stopped, not yet ended (a zombie has ended; its parent reaps it later)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Sessions of a replica idle inside a transaction that has locked rows of the jobs table.
IN_A_TRANSACTION = """SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
    JOIN pg_class c ON c.oid = l.relation
    WHERE a.application_name = %s AND a.state = 'idle in transaction' AND c.relname = 'jobs'"""


def stopped(process: psutil.Process) -> bool:
    """Every thread of the process stopped (SIGSTOP stops each at its next return to user
    space)."""
    return all(
        psutil.Process(thread.id).status() == psutil.STATUS_STOPPED for thread in process.threads()
    )


def freeze_inside_a_transaction(
    server: ServerProcess, database_url: str, replica: str
) -> list[psutil.Process]:
    """SIGSTOP the trainer at a moment it holds a transaction open on the job database
    (between two statements: its job's row locked), then its descendants (the zygote, the
    training processes). Returns them, the server first."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    deadline = time.monotonic() + 120
    with psycopg.connect(database_url, autocommit=True) as watcher:
        while True:
            root.suspend()
            while not stopped(root):
                pass
            found = watcher.execute(IN_A_TRANSACTION, (f"loraforge-trainer-{replica}",))
            if found.fetchone()[0]:
                break
            root.resume()
            assert time.monotonic() < deadline, "the trainer never held a transaction open"
    tree = [root, *root.children(recursive=True)]
    for process in tree[1:]:
        process.suspend()
    return tree


def thaw(processes: list[psutil.Process]) -> None:
    """Resume whatever is still stopped, before the servers are told to stop."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.resume()


def test_a_frozen_replica_wakes_to_find_its_job_taken_and_stops_it(
    tiny_model: Path, tmp_path: Path, postgres_server, s3_url: str, s3_server
) -> None:
    fleet = Fleet(tiny_model, tmp_path, postgres_server.new_database(), s3_url, s3_server.env)
    with ExitStack() as stack:
        a_server = stack.enter_context(fleet.trainer("a"))
        a = stub(a_server, stack)
        job_id, last = start_long_job(a, tuning_steps=300)
        with TrainingProcesses(job_id, running_only=True) as processes:
            frozen = [psutil.Process(pid) for pid in processes.now()]
            tree = freeze_inside_a_transaction(a_server, fleet.database_url, "a")
            stack.callback(thaw, tree)  # a failing test leaves no process stopped
            b = stub(stack.enter_context(fleet.trainer("b")), stack)  # b takes the job over
            taken = False
            after_freeze = trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=last)
            for event in b.WatchJob(after_freeze, timeout=300):
                kind = event.WhichOneof("kind")
                taken |= kind == "log" and "replica b resumes" in event.log.message
                if taken and kind == "progress":
                    break  # b trains the job now
            # a wakes: the server first, as its clock tells it the lease is gone ...
            psutil.Process(a_server.process.pid).resume()
            deadline = time.monotonic() + 60
            while STOPPED_IN_TIME not in a_server.log():
                assert time.monotonic() < deadline, a_server.log()
                time.sleep(0.05)
            for process in frozen:  # ... then the training process it has already killed:
                with contextlib.suppress(psutil.NoSuchProcess):  # its SIGKILL comes first
                    process.resume()
            while any(alive(p) for p in frozen):  # the kernel ends a killed process promptly
                assert time.monotonic() < deadline, "the killed training process lives on"
                time.sleep(0.05)
            for process in tree[1:]:  # the rest (its zygote) reaps it, and ends when a stops
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.resume()
            events = watch(b, job_id)
            job = b.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=60)
    assert_ran_once_and_finished(job, events, processes)  # counting running processes
    assert psutil.wait_procs(tree, timeout=30)[1] == [], "a's processes outlived it"
    messages = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert any("replica a stopped renewing its lease; replica b resumes" in m for m in messages)
