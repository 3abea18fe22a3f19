"""The training process: ``python -m trainer_service.training.run --job-dir D --artifacts-dir A``.

The trainer server starts one per job (directly, or under ``torch.distributed.run`` for several
GPUs). It reads the job folder (jobdir.py), resumes from the latest checkpoint there, writes
bundles into the artifact store, and reports events (events.py) as JSON lines on stdout.
Exit codes: 0 done, 3 cancelled (SIGTERM), 1 failed (an error-level log event says why).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import traceback
from pathlib import Path

EXIT_CANCELLED = 3


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so no orphan keeps training. Each training
    process sets it; under torch.distributed.run (whose own parent is the server) the
    launcher gets it through ``tethered``."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--artifacts-dir", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)

    die_with_parent()
    from loraforge_core.logs import configure_logging

    configure_logging("info")  # JSON lines in train.log, under the job's request id
    # Events go to the real stdout; anything libraries print goes to stderr.
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    from trainer_service.events import JsonLinesReporter, Log
    from trainer_service.jobdir import JobDir
    from trainer_service.training.trainer import RunPaths, StopRequested, Trainer

    reporter = JsonLinesReporter(stream)
    job = JobDir(args.job_dir)
    # One training of a job at a time: the data-parallel group's first process holds the
    # job's lock for the group (its other ranks would wait on it forever).
    lock = job.lock() if int(os.environ.get("RANK", "0")) == 0 else None  # noqa: F841
    try:
        trainer = Trainer(
            job.config(), job.examples(), RunPaths(job.checkpoints, args.artifacts_dir),
            reporter, should_stop=lambda: stop["requested"],
        )  # fmt: skip
        trainer.run(resume=not args.no_resume)
        return 0
    except StopRequested:
        reporter.emit(Log("info", "stopped on request"))
        return EXIT_CANCELLED
    except BrokenPipeError:
        return EXIT_CANCELLED
    except Exception as err:  # reported to the server, which fails the job with it
        traceback.print_exc()
        with contextlib.suppress(BrokenPipeError):
            reporter.emit(Log("error", f"{type(err).__name__}: {err}"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
