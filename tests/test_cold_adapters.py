"""A cold adapter (in the artifact store, not yet on the generator's disk) is downloaded off the
pipeline thread and outside the registry's lock: while its download hangs on a paused S3
server, other requests render, ListAdapters answers and /metrics scrapes; requests for the
same cold adapter share one download. Real generator, real SeaweedFS (SIGSTOP/SIGCONT)."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from loraforge.v1 import generator_pb2, generator_pb2_grpc

from loraforge_core.artifacts import publish_bundle
from loraforge_core.launch import ServerProcess, free_port
from loraforge_core.objectstore import open_object_store
from trainer_service.training.lora import random_lora_bundle

pytestmark = pytest.mark.slow

PNG = b"\x89PNG"


def request(*adapter_ids: str) -> generator_pb2.GenerateRequest:
    return generator_pb2.GenerateRequest(
        prompt="a red circle", width=32, height=32, num_inference_steps=2, seed=1,
        adapters=[generator_pb2.AdapterRef(adapter_id=a, scale=1.0) for a in adapter_ids],
    )  # fmt: skip


def wait_for_line(server: ServerProcess, text: str, timeout: float = 120.0) -> None:
    """Until the server's log says ``text`` (an event it logs, polled)."""
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{server.log()}"
        time.sleep(0.1)


def test_a_cold_adapter_downloads_alone_while_other_requests_flow(
    tiny_model: Path, tmp_path: Path, s3_server, s3_url: str
) -> None:
    bundle = random_lora_bundle(str(tiny_model), tmp_path / "made", seed=1, rank=4)
    publish_bundle(open_object_store(s3_url, tmp_path), bundle.path)
    metrics_port = free_port()
    generator = ServerProcess(
        "generator", data_dir=tmp_path / "g", model=str(tiny_model), env=s3_server.env,
        extra_args=["--artifact-store", s3_url, "--metrics-port", str(metrics_port)],
    )  # fmt: skip
    with (
        generator,
        grpc.insecure_channel(generator.target) as channel,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        assert stub.Generate(request(), timeout=120).images[0].data.startswith(PNG)
        os.kill(s3_server.process.pid, signal.SIGSTOP)
        try:
            cold = [pool.submit(stub.Generate, request(bundle.id), timeout=300) for _ in range(2)]
            wait_for_line(generator, "fetching bundle from the artifact store")
            # The download hangs on the paused store; the rest of the server does not.
            assert stub.Generate(request(), timeout=60).images[0].data.startswith(PNG)
            assert (
                list(stub.ListAdapters(generator_pb2.ListAdaptersRequest(), timeout=10).adapters)
                == []
            )
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as scrape:
                assert b"loraforge_generator" in scrape.read()
            assert not any(c.done() for c in cold)
        finally:
            os.kill(s3_server.process.pid, signal.SIGCONT)
        for reply in (c.result() for c in cold):
            assert reply.images[0].data.startswith(PNG)
        listed = stub.ListAdapters(generator_pb2.ListAdaptersRequest(), timeout=10).adapters
        assert [a.adapter_id for a in listed] == [bundle.id]
    log = generator.log()
    assert log.count("fetching bundle from the artifact store") == 1, log  # one download
    assert log.count("bundle fetched from the artifact store") == 1, log
