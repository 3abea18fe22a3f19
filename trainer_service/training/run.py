"""The training process: ``python -m trainer_service.training.run --job-dir D --artifacts-dir A``.

The trainer server starts one per job (directly, or under ``accelerate launch`` for several
GPUs). It reads ``config.json`` and ``images/`` from the job folder, resumes from the latest
checkpoint there, writes bundles into the artifact store, and reports JSON lines on stdout.
Exit codes: 0 done, 3 cancelled (SIGTERM), 1 failed (an ``error`` event says why).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import traceback
from pathlib import Path

EXIT_CANCELLED = 3
IMAGES_INDEX = "images.json"


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the server dies, so no orphan keeps training."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def load_examples(job_dir: Path) -> list:
    from PIL import Image

    from trainer_service.training.data import InstanceExample

    index = json.loads((job_dir / IMAGES_INDEX).read_text())
    examples = []
    for item in index:
        with Image.open(job_dir / "images" / item["stored_as"]) as image:
            examples.append(
                InstanceExample(image.convert("RGB"), item["filename"], item.get("caption", ""))
            )
    return examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--artifacts-dir", type=Path, required=True)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)

    _die_with_parent()
    # Events go to the real stdout; anything libraries print goes to stderr.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    from trainer_service.config import TrainingConfig
    from trainer_service.training.engine import RunPaths, StopRequested, Trainer
    from trainer_service.training.events import JsonLinesReporter

    reporter = JsonLinesReporter(events)
    # One training process per job folder at a time (an old one may still be stopping).
    lock = open(args.job_dir / "train.lock", "a+")  # noqa: SIM115 - held until exit
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        config = TrainingConfig.from_json((args.job_dir / "config.json").read_text())
        trainer = Trainer(
            config, load_examples(args.job_dir),
            RunPaths(args.job_dir / "checkpoints", args.artifacts_dir),
            reporter, should_stop=lambda: stop["requested"],
        )  # fmt: skip
        trainer.run(resume=not args.no_resume)
        return 0
    except StopRequested:
        reporter.emit("log", level="info", message="stopped on request")
        return EXIT_CANCELLED
    except BrokenPipeError:
        return EXIT_CANCELLED
    except Exception as err:  # reported to the server, which fails the job with it
        traceback.print_exc()
        with contextlib.suppress(BrokenPipeError):
            reporter.emit("error", message=f"{type(err).__name__}: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
