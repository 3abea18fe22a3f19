"""``loraforge-trainer``: run the trainer server, or build the tiny offline model."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from loraforge_core.settings import ServerSettings, add_setting

DEFAULT_PORT = 50051


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Trainer gRPC server")
    ServerSettings.add_arguments(serve, default_port=DEFAULT_PORT)
    add_setting(
        serve,
        "--num-processes",
        default=1,
        type=int,
        help="training processes per job (accelerate data parallel; one per GPU)",
    )
    tiny = commands.add_parser("tiny-model", help="write the tiny offline SD model to a folder")
    tiny.add_argument("output", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "tiny-model":
        from loraforge_core.models import save_tiny_model

        print(save_tiny_model(args.output, seed=args.seed))
        return
    from loraforge_core.grpc_edge import serve
    from loraforge_core.logs import configure_logging
    from trainer_service.server import TrainerService

    settings = ServerSettings.from_args(args)
    try:
        settings.validate()
    except ValueError as err:
        build_parser().error(str(err))
    configure_logging(settings.log_level)
    sys.exit(
        asyncio.run(serve(TrainerService(settings, num_processes=args.num_processes), settings))
    )
