"""The main job (``make demo``): both services on the embedded default model, end to end.

Runs offline on CPU. Starts the trainer and the generator as real server processes on loopback
ports, waits until both report SERVING on grpc.health.v1, and shuts them down with SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loraforge_core.launch import ServerProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument("--model", default="", help="base model (default: the tiny model)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="loraforge-demo-"))
    started = time.monotonic()
    trainer = ServerProcess("trainer", data_dir=data_dir / "trainer", model=args.model)
    generator = ServerProcess("generator", data_dir=data_dir / "generator", model=args.model)
    try:
        for server in (trainer.start(), generator.start()):
            server.wait_serving(timeout=300)
            print(f"{server.kind:9s} serving on {server.target}")
    finally:
        codes = {s.kind: s.terminate() for s in (generator, trainer)}
    print(f"both services stopped cleanly in {time.monotonic() - started:.1f}s: {codes}")
    return 0 if not any(codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
