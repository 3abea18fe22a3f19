"""``loraforge-generator``: run the Generator server."""

from __future__ import annotations

import argparse
import asyncio
import sys

from loraforge_core.settings import ServerSettings

DEFAULT_PORT = 50052


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge-generator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Generator gRPC server")
    ServerSettings.add_arguments(serve, default_port=DEFAULT_PORT)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from inference_service.server import GeneratorService
    from loraforge_core.grpc_edge import serve
    from loraforge_core.logs import configure_logging

    settings = ServerSettings.from_args(args)
    configure_logging(settings.log_level)
    sys.exit(asyncio.run(serve(GeneratorService(settings), settings)))
