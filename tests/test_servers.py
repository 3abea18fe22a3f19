"""Both real servers on loopback: health, reflection, environment settings, SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraforge_core import forkserver
from loraforge_core.launch import ServerProcess, health_status

SERVICE = {"trainer": "loraforge.v1.Trainer", "generator": "loraforge.v1.Generator"}


def _reflected_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        return {s.name for s in reply.list_services_response.service}


# The stack a generator imports and a trainer server must not load to serve: it trains in
# child processes (forked from its zygote), and torch would cost every replica's start 3 s.
STACK = {"torch", "diffusers", "transformers", "peft"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trainer", "generator"])
def test_server_is_healthy_reflects_and_stops_on_sigterm(
    kind: str, tiny_model: Path, tmp_path: Path
) -> None:
    # Exec'd (not forked from the tests' preloaded forkserver), with Python's import profile on
    # stderr, which is the server's log (and its zygote's, which imports the training stack).
    env = {"PYTHONPROFILEIMPORTTIME": "1", forkserver.ENV: ""}
    server = ServerProcess(kind, data_dir=tmp_path, model=str(tiny_model), env=env).start()
    try:
        server.wait_serving()
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health_status(server.target, SERVICE[kind]) == serving
        services = _reflected_services(server.target)
        assert {SERVICE[kind], "grpc.health.v1.Health"} <= services
        assert server.process is not None
        mapped = {Path(m.path).name for m in psutil.Process(server.process.pid).memory_maps()}
    finally:
        code = server.terminate()
    assert code == 0, server.log()
    assert '"msg": "stopped"' in server.log()
    lines = server.log_path.read_text().splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    if kind == "trainer":  # its zygote imports the stack (and logs it), the server loads none
        assert not [name for name in mapped if name.startswith("libtorch")], mapped
    else:
        assert imported >= STACK  # the profile saw the imports
    # Everything else is a JSON line: no library progress bar or warning breaks a collector.
    others = [line for line in lines if not line.startswith("import time:")]
    assert others and all(line.startswith("{") for line in others), others[:5]


@pytest.mark.slow
def test_settings_come_from_the_environment(tiny_model: Path, tmp_path: Path) -> None:
    """LORAFORGE_MODEL stands in for the --model flag."""
    server = ServerProcess("generator", data_dir=tmp_path)
    # Drop the --model flag: the model must come from the environment.
    index = server.args.index("--model")
    del server.args[index : index + 2]
    server.env["LORAFORGE_MODEL"] = str(tiny_model)
    with server:
        assert str(tiny_model) in server.log()


def test_bad_device_fails_fast_with_a_clear_message(tmp_path: Path, tiny_model: Path) -> None:
    server = ServerProcess(
        "generator", data_dir=tmp_path, model=str(tiny_model), extra_args=["--device", "tpu"]
    ).start()
    assert server.process is not None
    assert server.process.wait(60) != 0
    assert "device must be auto, cpu, cuda or cuda:N" in server.log()


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--max-jobs", "99"], {}, "argument --max-jobs: --max-jobs must be in 0..64"),
    (["--max-jobs", "two"], {}, "argument --max-jobs: invalid int value: 'two'"),
    ([], {"LORAFORGE_LEASE_SECONDS": "1"}, "LORAFORGE_LEASE_SECONDS='1': --lease-seconds must be"),
    (["--port", "70000"], {}, "argument --port: port must be in 0..65535"),
])  # fmt: skip
def test_a_flag_out_of_range_names_the_flag_and_its_range(args, env, message) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer_service", "serve", *args], capture_output=True,
        text=True, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_server_that_dies_inside_the_block_fails_the_block(tmp_path: Path) -> None:
    """The harness reads the exit code: a server that crashed during a test (here: SIGKILLed
    behind the harness's back) fails it, where it used to be terminated quietly."""
    import signal

    server = ServerProcess("generator", data_dir=tmp_path, model="tiny-random")
    dies = pytest.raises(RuntimeError, match=r"generator exited with -9, not 0, on SIGTERM")
    with dies, server:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
