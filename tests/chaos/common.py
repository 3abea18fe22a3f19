"""What the chaos tests share: a long job started on a fleet replica and watched past its
first checkpoints, the job's training processes sampled from /proc, and the invariants every
fault must leave intact."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import psutil
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from tests.test_trainer_service import job_request

PAST_STEP = 16  # a fault is injected after the checkpoint at this step: in the tuning phase


def start_long_job(stub: trainer_pb2_grpc.TrainerStub, tuning_steps: int) -> tuple[str, int]:
    """A job of ``tuning_steps`` LoRA steps, checkpointed every 8, watched until its
    checkpoint at ``PAST_STEP``: (its id, the sequence of that event)."""
    request = job_request(max_train_steps_ti=4, max_train_steps_tuning=tuning_steps, save_steps=8)
    job_id = stub.CreateJob(request, timeout=30).job_id
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300):
        if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.global_step >= PAST_STEP:
            return job_id, event.sequence
    raise AssertionError(f"job {job_id} ended before its checkpoint at step {PAST_STEP}")


PF_EXITING = 0x4  # the kernel's flag for a process in do_exit: it runs no more of its code
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)  # in /proc/<pid>/status's masks of pending signals


def exiting(pid: int) -> bool:
    """Whether the process is ending: SIGKILLed (woken to die: a stopped one shows as running
    until the scheduler gets to it, which on a busy machine takes tens of milliseconds, and it
    runs none of its code again) or in do_exit (it still shows as running while the kernel
    frees its memory, tens of milliseconds for a training process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    flags = int(stat.rsplit(")", 1)[1].split()[6])  # field 9; the name may hold spaces
    pending = [line.split()[1] for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:"))]  # fmt: skip
    return bool(flags & PF_EXITING) or any(int(mask, 16) & SIGKILL_BIT for mask in pending)


class TrainingProcesses:
    """Samples /proc for a job's training processes until stopped; the most seen at once
    (with ``running_only``, not counting frozen ones: SIGSTOP, or ending, or zombies)."""

    def __init__(self, job_id: str, *, running_only: bool = False) -> None:
        self.job_id = job_id
        self.running_only = running_only
        self.most = 0
        self.seen: list[tuple[int, str]] = []  # the processes counted when ``most`` was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> list[int]:
        return [pid for pid, _ in self._running()]

    def _running(self) -> list[tuple[int, str]]:
        """(pid, what /proc said of it) of each training process of the job counted now."""
        found = []
        for process in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "trainer_service.training.run" not in cmdline or self.job_id not in cmdline:
                continue
            pid, status = process.info["pid"], process.info["status"]
            frozen = status in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
            if not (self.running_only and (frozen or exiting(pid))):
                found.append((pid, f"{status}, parent {process.info['ppid']}: {cmdline}"))
        return found

    def _sample(self) -> None:
        while not self._stop.is_set():
            running = self._running()
            if len(running) > self.most:
                self.most, self.seen = len(running), running  # for the failure message
            self._stop.wait(0.05)

    def __enter__(self) -> TrainingProcesses:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def assert_ran_once_and_finished(job, events: list, processes: TrainingProcesses) -> None:
    """The invariants after any fault: SUCCEEDED, never two training processes at once, a
    gapless event log, and no training process left."""
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
    assert processes.most == 1, f"training processes running the job at once: {processes.seen}"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # no gaps
    assert processes.now() == []  # nothing left behind
