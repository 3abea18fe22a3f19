"""Operations: Prometheus metrics scraped by a real Prometheus, and request ids in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from loraforge_core.bundle import pack
from loraforge_core.launch import ServerProcess, free_port
from tests.helpers import random_bundle
from tests.services import Prometheus, running
from tests.test_deploy import monitoring_queries
from tests.test_trainer_service import job_request

pytestmark = pytest.mark.slow

QUICK = dict(max_train_steps_ti=2, max_train_steps_tuning=2, save_steps=2)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def value(prom, expression: str) -> float:
    result = prom.query(expression)
    assert len(result) == 1, (expression, result)
    return float(result[0]["value"][1])


def seen(prom, expression: str, deadline_s: float = 60.0) -> None:
    """Wait until a PromQL filter expression (``metric == 2``) matches a scraped sample."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if prom.query(expression):
            return
        time.sleep(0.5)  # the next scrape is the event; Prometheus has no push for it
    raise TimeoutError(f"Prometheus never saw {expression}")


def test_prometheus_scrapes_what_the_services_did(tiny_model: Path, tmp_path: Path) -> None:
    ports = {"trainer": free_port(), "generator": free_port()}
    bundle = random_bundle(str(tiny_model), tmp_path / "store", seed=3, token="<m1>")
    trainer_args = ["--metrics-port", str(ports["trainer"])]
    with (
        running(Prometheus(tmp_path / "prometheus",
                           {k: f"127.0.0.1:{p}" for k, p in ports.items()})) as prom,
        ServerProcess("generator", data_dir=tmp_path / "g", model=str(tiny_model),
                      extra_args=["--metrics-port", str(ports["generator"])]) as generator,
        grpc.insecure_channel(generator.target) as g_channel,
    ):  # fmt: skip
        # A replica that runs nothing (--max-jobs 0) takes two jobs: they wait in the queue
        # until Prometheus has seen them there, whatever its first scrape's delay.
        with (
            ServerProcess("trainer", data_dir=tmp_path / "t", model=str(tiny_model),
                          extra_args=[*trainer_args, "--max-jobs", "0"]) as front,
            grpc.insecure_channel(front.target) as t_channel,
        ):  # fmt: skip
            t = trainer_pb2_grpc.TrainerStub(t_channel)
            ids = [t.CreateJob(job_request(**QUICK), timeout=30).job_id for _ in range(2)]
            seen(prom, "loraforge_trainer_queue_depth == 2")
        # A replica that trains, on the same store and metrics port, takes them one at a time.
        with (
            ServerProcess("trainer", data_dir=tmp_path / "t", model=str(tiny_model),
                          extra_args=trainer_args) as trainer,
            grpc.insecure_channel(trainer.target) as t_channel,
        ):  # fmt: skip
            t = trainer_pb2_grpc.TrainerStub(t_channel)
            g = generator_pb2_grpc.GeneratorStub(g_channel)
            g.LoadAdapter(generator_pb2.LoadAdapterRequest(adapter_id="m", data=pack(bundle.path)))
            for adapters in ([], [("m", 1.0)], [("m", 0.5)], [("m", 1.0)]):
                g.Generate(generator_pb2.GenerateRequest(
                    prompt="a <m1>", width=32, height=32, num_inference_steps=3, seed=1,
                    adapters=[generator_pb2.AdapterRef(adapter_id=a, scale=s) for a, s in adapters],
                ), timeout=60)  # fmt: skip
            for job_id in ids:
                list(t.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300))
            seen(prom, f"count(timestamp(up) > {time.time()}) == 2")  # both scraped since
            assert_scraped(prom, raw=scrape(ports["generator"]))  # raw: what curl shows


def assert_scraped(prom, raw: str) -> None:
    assert "loraforge_generator_requests_waiting" in raw
    assert 'loraforge_generator_adapters_info{max_resident="8",resident="m"} 1.0' in raw
    # The queue rose (the first replica's samples) and fell back to empty.
    assert value(prom, "max_over_time(loraforge_trainer_queue_depth[10m])") == 2
    assert value(prom, "loraforge_trainer_queue_depth") == 0
    assert value(prom, 'loraforge_trainer_jobs{state="succeeded"}') == 2
    assert value(prom, "loraforge_trainer_steps_total") == 8
    assert value(prom, "sum(loraforge_trainer_job_duration_seconds_count)") == 2
    assert value(prom, 'loraforge_trainer_checkpoint_write_seconds_count{stage="write"}') >= 2
    assert value(prom, "loraforge_generator_images_total") == 4
    assert value(prom, "loraforge_generator_denoising_steps_total") == 12
    assert value(prom, 'loraforge_generator_adapter_loads_total{source="bytes"}') == 1
    assert value(prom, 'loraforge_generator_adapter_loads_total{source="resident"}') == 3
    assert value(prom, "loraforge_generator_adapters_resident") == 1
    assert value(prom, 'loraforge_rpc_duration_seconds_count{rpc="Generate",code="OK"}') == 4
    created = 'max_over_time(loraforge_rpc_duration_seconds_count{rpc="CreateJob",code="OK"}[10m])'
    assert value(prom, created) == 2  # on the first replica
    # The deploy overlay's scalers and alerts are valid PromQL over these very metrics:
    # the scalers get a number, and no alert fires on a healthy run.
    for name, expression in monitoring_queries().items():
        result = prom.query(expression)
        if name.startswith("loraforge-"):
            assert len(result) == 1, (name, result)
        else:
            assert result == [], (name, result)


def log_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    return lines


def test_a_request_id_follows_the_call_into_every_log_line(tiny_model: Path, tmp_path: Path):
    with (
        ServerProcess("trainer", data_dir=tmp_path / "t", model=str(tiny_model)) as trainer,
        ServerProcess("generator", data_dir=tmp_path / "g", model=str(tiny_model)) as generator,
        grpc.insecure_channel(trainer.target) as t_channel,
        grpc.insecure_channel(generator.target) as g_channel,
    ):
        t = trainer_pb2_grpc.TrainerStub(t_channel)
        job, call = t.CreateJob.with_call(
            job_request(**QUICK), metadata=[("x-request-id", "req-train-42")], timeout=30
        )
        assert ("x-request-id", "req-train-42") in call.trailing_metadata()
        list(t.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
        g = generator_pb2_grpc.GeneratorStub(g_channel)
        with pytest.raises(grpc.RpcError) as refused:  # an error answer carries it too
            g.Generate(generator_pb2.GenerateRequest(prompt=""),
                       metadata=[("x-request-id", "req-gen-7")])  # fmt: skip
        assert ("x-request-id", "req-gen-7") in refused.value.trailing_metadata()
        _, call = g.Generate.with_call(generator_pb2.GenerateRequest(prompt="x"), timeout=60)
        generated = dict(call.trailing_metadata())["x-request-id"]  # none sent: a new one
        assert len(generated) == 32
        typed_ids = typed_client_request_ids(generator.target)
        trainer_log = trainer.log_path
        generator_log = generator.log_path
    server_lines = [e for e in log_lines(trainer_log) if e.get("request_id") == "req-train-42"]
    assert {"job created"} <= {e["msg"] for e in server_lines}
    assert any(e.get("job_id") == job.job_id for e in server_lines)
    training = log_lines(tmp_path / "t" / "jobs" / job.job_id / "train.log")
    phases = [e for e in training if e["msg"].startswith("phase ")]
    assert phases and all(e.get("request_id") == "req-train-42" for e in phases)
    refused_lines = [e for e in log_lines(generator_log) if e.get("request_id") == "req-gen-7"]
    assert refused_lines, "the refused call logged under its id"
    # The typed clients: the id given with request_id() reaches the server's log and comes
    # back on the error; a call without one gets the server's id, on the error too.
    assert typed_ids["sync"] == "req-typed-3" and typed_ids["async"] == "req-async-5"
    assert len(typed_ids["unnamed"]) == 32 and typed_ids["unnamed"] != generated
    assert typed_ids["cli"] == "req-cli-9"
    logged = {e.get("request_id") for e in log_lines(generator_log)}
    assert {"req-typed-3", "req-async-5", "req-cli-9", typed_ids["unnamed"]} <= logged
    # One line per finished call: its rpc, status code, duration and the ids it names.
    finished = [(e["msg"], e.get("rpc"), e.get("code")) for e in log_lines(generator_log)
                if e.get("request_id") == generated]  # fmt: skip
    assert ("call finished", "Generate", "OK") in finished
    watched = [e for e in log_lines(trainer_log) if e.get("rpc") == "WatchJob"]
    assert [(e["msg"], e["code"], e["job_id"]) for e in watched] == [
        ("call finished", "OK", job.job_id)] and watched[0]["seconds"] > 0  # fmt: skip


def typed_client_request_ids(target: str) -> dict[str, str]:
    """The request id each typed-client call's error carries (the calls are refused: an
    empty prompt)."""
    from loraforge_client import (
        AsyncGeneratorClient,
        GeneratorClient,
        InvalidArgumentError,
        request_id,
    )
    from loraforge_client.cli import main as cli

    found = {}
    with GeneratorClient(target, timeout=30) as client:
        with request_id("req-typed-3"), pytest.raises(InvalidArgumentError) as named:
            client.generate("")
        found["sync"] = named.value.request_id
        with pytest.raises(InvalidArgumentError) as unnamed:
            client.generate("")
        found["unnamed"] = unnamed.value.request_id

    async def in_a_task() -> str:
        async with AsyncGeneratorClient(target, timeout=30) as client:
            with request_id("req-async-5"), pytest.raises(InvalidArgumentError) as caught:
                await client.generate("")
        return caught.value.request_id

    found["async"] = asyncio.run(in_a_task())
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        cli(["--generator", target, "--request-id", "req-cli-9", "generate", "", "-o", "/tmp"])
    found["cli"] = stderr.getvalue().rsplit("(request id ", 1)[-1].split(")")[0]
    return found


def test_the_metrics_endpoint_binds_the_address_it_is_given(tmp_path: Path) -> None:
    """/metrics has no auth: an operator binds it apart from gRPC's --host (here 127.0.0.2,
    a loopback address of its own), and it answers there only."""
    import urllib.error
    import urllib.request

    port = free_port()
    metrics = ["--metrics-port", str(port), "--metrics-host", "127.0.0.2"]
    with ServerProcess("generator", data_dir=tmp_path, model="tiny-random", extra_args=metrics):
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10) as reply:
            assert b"# HELP loraforge_" in reply.read()
        with pytest.raises(urllib.error.URLError):  # not on the gRPC address
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
