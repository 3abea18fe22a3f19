"""Server settings shared by both services: CLI flags with ``LORAFORGE_*`` environment defaults.

Precedence: flag > environment variable > built-in default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LORAFORGE_"


def env_name(flag: str) -> str:
    """``--data-dir`` -> ``LORAFORGE_DATA_DIR``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_setting(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any,
    type: Callable[[str], Any] = str,
    help: str,
    **kwargs: Any,
) -> None:
    """Add a flag whose default comes from its ``LORAFORGE_*`` variable when that is set."""
    variable = env_name(flag)
    raw = os.environ.get(variable)
    value = default
    if raw is not None:
        try:
            value = type(raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            parser.error(f"{variable}={raw!r}: {err}")
    parser.add_argument(
        flag,
        default=value,
        type=type,
        help=f"{help} (env {variable}; default {default!r})",
        **kwargs,
    )


def server_parser(
    prog: str, description: str | None, service: str, default_port: int
) -> tuple[argparse.ArgumentParser, Any, argparse.ArgumentParser]:
    """A service CLI's parser, its subcommands, and its ``serve`` command with the flags every
    server shares (the caller adds its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help=f"run the {service} gRPC server")
    ServerSettings.add_arguments(serve, default_port=default_port)
    return parser, commands, serve


def _device(raw: str) -> str:
    from loraforge_core.devices import validate_device

    try:
        return validate_device(raw)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def in_range(kind: Callable[[str], Any], low: Any, high: Any, flag: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(raw)``, refused outside ``low..high`` with a message that
    names ``flag``."""

    def parse(raw: str) -> Any:
        value = kind(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{flag} must be in {low}..{high}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse: "invalid int value"
    return parse


_port = in_range(int, 0, 65535, "port")


@dataclass
class ServerSettings:
    """What every loraforge server needs to start."""

    host: str = "127.0.0.1"
    port: int = 50051
    model: str = ""
    data_dir: Path = field(default_factory=lambda: Path("./loraforge-data"))
    artifact_store: str = ""
    device: str = "auto"
    grace_period: float = 10.0
    log_level: str = "info"
    max_message_mb: int = 64
    metrics_port: int = 0
    metrics_host: str = ""  # empty: --host's
    auth_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, default_port: int) -> None:
        add_setting(parser, "--host", default=cls.host, help="address to bind")
        add_setting(parser, "--port", default=default_port, type=_port, help="port to bind")
        add_setting(
            parser, "--model", default="",
            help="base model: hub id or local diffusers folder; empty: the tiny offline model",
        )  # fmt: skip
        add_setting(
            parser,
            "--data-dir",
            default=Path("./loraforge-data"),
            type=Path,
            help="where jobs, artifacts and adapters are kept",
        )
        add_setting(
            parser,
            "--artifact-store",
            default="",
            help="where bundles, job inputs and checkpoints are shared: s3://BUCKET[/PREFIX] "
            "(endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_REGION); empty: the data dir",
        )
        add_setting(
            parser, "--device", default="auto", type=_device, help="auto, cpu, cuda or cuda:N"
        )
        add_setting(
            parser,
            "--grace-period",
            default=10.0,
            type=float,
            help="seconds in-flight calls get to finish on SIGTERM",
        )
        add_setting(
            parser,
            "--log-level",
            default="info",
            choices=["debug", "info", "warning", "error"],
            help="log level",
        )
        add_setting(
            parser,
            "--max-message-mb",
            default=64,
            type=int,
            help="largest gRPC message accepted or sent, in MiB",
        )

        add_setting(
            parser,
            "--metrics-port",
            default=0,
            type=_port,
            help="HTTP port of the Prometheus metrics (/metrics, on --metrics-host); 0: none",
        )
        add_setting(
            parser,
            "--metrics-host",
            default="",
            help="address the metrics endpoint binds (it has no auth: the pod's own address, "
            "scraped inside the cluster network, or 127.0.0.1 behind a sidecar); empty: --host",
        )
        add_setting(
            parser,
            "--auth-token-file",
            default=None,
            type=Path,
            help="file of bearer tokens, one per line; unset: no auth",
        )
        add_setting(parser, "--tls-cert", default=None, type=Path, help="PEM certificate")
        add_setting(parser, "--tls-key", default=None, type=Path, help="PEM private key")
        add_setting(
            parser,
            "--tls-client-ca",
            default=None,
            type=Path,
            help="PEM CA of client certificates (mutual TLS)",
        )

    @classmethod
    def from_cli(cls, args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerSettings:
        """The settings of a parsed ``serve`` command; settings that cannot work together end
        the program with the parser's usage error."""
        settings = cls.from_args(args)
        try:
            settings.validate()
        except ValueError as err:
            parser.error(str(err))
        return settings

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        return cls(
            host=args.host,
            port=args.port,
            model=args.model,
            data_dir=args.data_dir,
            artifact_store=args.artifact_store,
            device=args.device,
            grace_period=args.grace_period,
            log_level=args.log_level,
            max_message_mb=args.max_message_mb,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            auth_token_file=args.auth_token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
        )

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        if self.artifact_store and not self.artifact_store.startswith("s3://"):
            raise ValueError("--artifact-store must be s3://BUCKET[/PREFIX] or empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for name in ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
        if self.auth_token_file is not None:
            from loraforge_core.auth import read_tokens

            read_tokens(self.auth_token_file)


LEASE_SECONDS = 30.0


@dataclass
class FleetSettings:
    """How a trainer replica shares jobs with others: the job database (empty: SQLite under the
    data dir, this replica alone), its name in leases, and the lease length."""

    database_url: str = ""
    replica_id: str = ""
    lease_seconds: float = LEASE_SECONDS

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_setting(
            parser, "--database-url", default="",
            help="job store and queue shared by trainer replicas: "
            "postgresql://user:pass@host/db; empty: SQLite under --data-dir, for this replica "
            "alone",
        )  # fmt: skip
        add_setting(
            parser, "--replica-id", default="",
            help="this replica's name in job leases (default: HOST:PORT with a database, else "
            "'local'); unique per replica",
        )  # fmt: skip
        add_setting(
            parser, "--lease-seconds", default=LEASE_SECONDS,
            type=in_range(float, 3, 3600, "--lease-seconds"),
            help="a running job's lease, renewed every third of it; a replica that dies loses "
            "its jobs to another replica after at most this long",
        )  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FleetSettings:
        return cls(args.database_url, args.replica_id, args.lease_seconds)
