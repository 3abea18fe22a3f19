"""Start loraforge servers as child processes and wait for health: used by the demo, the
benchmarks and the tests, so all three exercise the real server entry points. Where
``LORAFORGE_FORKSERVER`` is set, a server is forked from that preloaded process
(``loraforge_core.forkserver``) rather than exec'd: the same entry point, without the 6 s of
imports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraforge_core import forkserver

SERVERS = {"trainer": "trainer_service", "generator": "inference_service"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_status(target: str, service: str = "", timeout: float = 2.0) -> int | None:
    """The health status of target, or None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return reply.status


class ServerProcess:
    """One server child process on a loopback port, with its log captured to a file."""

    def __init__(
        self,
        kind: str,
        *,
        data_dir: Path,
        model: str = "",
        port: int | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.killed = False  # SIGKILLed on purpose (kill()): its exit code says nothing
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir / f"{kind}-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            SERVERS[kind],
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--model",
            model,
            "--device",
            "cpu",
            *(extra_args or []),
        ]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | forkserver.ForkedServer | None = None

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = forkserver.spawn(self.args[2], self.args[3:], self.env, log.fileno())
            if self.process is None:
                self.process = subprocess.Popen(self.args, stdout=log, stderr=log, env=self.env)
        return self

    def wait_serving(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited ({self.process.returncode}):\n{self.log()}")
            if health_status(self.target) == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"{self.kind} not serving after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL when it does not stop. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        self.killed = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start().wait_serving()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """SIGTERM and wait. A server that then exits with an error (it died during the block,
        or did not drain and stop within the grace) fails the block, unless the block failed
        already or killed it on purpose."""
        try:
            code = self.terminate()
        except Exception:
            if exc_type is None:
                raise
            return
        if exc_type is None and not self.killed and code != 0:
            raise RuntimeError(f"{self.kind} exited with {code}, not 0, on SIGTERM:\n{self.log()}")
