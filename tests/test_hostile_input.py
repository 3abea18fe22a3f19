"""Hostile and malformed requests (hypothesis): every answer is a client error, never INTERNAL,
and the servers still answer health and a valid request afterwards."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from loraforge_core.launch import ServerProcess, health_status
from tests.helpers import shape_png

# Calls go one at a time, so the queue is never full: RESOURCE_EXHAUSTED here would mean an
# error status too large for gRPC's trailing metadata (hostile input echoed back).
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
}  # fmt: skip
OUTCOMES: Counter[str] = Counter()
EXAMPLES = 220
HOSTILE_TEXT = st.one_of(
    st.text(max_size=64),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b", "\x00",
                     "lora-" + "0" * 24, "%s%n", "' OR 1=1 --", "x" * 5000, "CON", "~root"]),
)  # fmt: skip
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30]),
)


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


BAD_IMAGES = st.one_of(
    st.binary(max_size=256),
    st.just(b""),
    st.builds(png_bomb, st.integers(5000, 2**31 - 1), st.integers(5000, 2**31 - 1)),
    st.just(shape_png()[:40]),  # truncated
    st.just(b"GIF89a" + b"\x00" * 40),
)


def expect_client_error(call, *args, **kwargs) -> None:
    try:
        result = call(*args, timeout=30, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
        OUTCOMES["ok"] += 1
    except grpc.RpcError as err:
        OUTCOMES[err.code().name] += 1
        OUTCOMES[f"{err.code().name} from {call._method.decode().rsplit('/', 1)[-1]}"] += 1
        assert err.code() in CLIENT_ERRORS, (err.code(), err.details())
        assert "Traceback" not in (err.details() or "")


@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    data = tmp_path_factory.mktemp("hostile")
    with (
        ServerProcess("trainer", data_dir=data / "t", model=str(tiny_model)) as trainer,
        ServerProcess("generator", data_dir=data / "g", model=str(tiny_model)) as generator,
    ):
        yield trainer, generator
    print("outcomes:", dict(OUTCOMES))


@pytest.fixture(scope="module")
def trainer_stub(servers) -> Iterator[trainer_pb2_grpc.TrainerStub]:
    with grpc.insecure_channel(servers[0].target) as channel:
        yield trainer_pb2_grpc.TrainerStub(channel)


@pytest.fixture(scope="module")
def generator_stub(servers) -> Iterator[generator_pb2_grpc.GeneratorStub]:
    with grpc.insecure_channel(servers[1].target) as channel:
        yield generator_pb2_grpc.GeneratorStub(channel)


# Every CreateJob carries at least one hostile image, so none may be queued.
create_requests = st.builds(
    trainer_pb2.CreateJobRequest,
    request_id=HOSTILE_TEXT,
    base_model=HOSTILE_TEXT,
    method=st.integers(0, 5),
    template=st.integers(0, 5),
    placeholder_tokens=st.lists(HOSTILE_TEXT, max_size=3),
    initializer_tokens=st.lists(HOSTILE_TEXT, max_size=3),
    instance_images=st.lists(
        st.builds(
            trainer_pb2.InstanceImage, data=BAD_IMAGES, filename=HOSTILE_TEXT, caption=HOSTILE_TEXT
        ),
        min_size=1,
        max_size=3,
    ),
    config=st.builds(
        trainer_pb2.TrainingConfig,
        resolution=st.integers(0, 2**32 - 1),
        lora_rank=st.integers(0, 2**32 - 1),
        learning_rate_unet=FLOATS,
        max_train_steps_ti=st.integers(0, 2**32 - 1),
        seed=st.integers(0, 2**64 - 1),
        lr_scheduler=st.integers(0, 9),
        lora_unet_target_modules=st.lists(HOSTILE_TEXT, max_size=2),
        validation_prompt=HOSTILE_TEXT,
    ),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    request=create_requests,
    job_id=HOSTILE_TEXT,
    token=HOSTILE_TEXT,
    after=st.integers(0, 2**64 - 1),
)
def test_trainer_rejects_hostile_requests(trainer_stub, request, job_id, token, after):
    expect_client_error(trainer_stub.CreateJob, request)
    expect_client_error(trainer_stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id))
    expect_client_error(trainer_stub.CancelJob, trainer_pb2.CancelJobRequest(job_id=job_id))
    expect_client_error(
        trainer_stub.WatchJob, trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after)
    )
    expect_client_error(
        trainer_stub.ListJobs,
        trainer_pb2.ListJobsRequest(page_size=after % 2**32, page_token=token, state=after % 11),
    )
    expect_client_error(
        trainer_stub.DownloadArtifact, trainer_pb2.DownloadArtifactRequest(artifact_id=token)
    )
    expect_client_error(
        trainer_stub.GetArtifact, trainer_pb2.GetArtifactRequest(artifact_id=job_id)
    )


def _poison(request: generator_pb2.GenerateRequest, which: int) -> None:
    """Make sure the request is invalid (no request may start a long render)."""
    if which == 0:
        request.width = 33
    elif which == 1:
        request.num_inference_steps = 10_000
    elif which == 2:
        request.adapters.add(adapter_id="../escape", scale=1.0)
    elif which == 3:
        request.adapters.add(adapter_id="ok-id", scale=float("nan"))
    elif which == 4:
        request.num_images = 1000
    else:
        request.prompt = ""


generate_requests = st.builds(
    generator_pb2.GenerateRequest,
    prompt=HOSTILE_TEXT, negative_prompt=HOSTILE_TEXT,
    width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1),
    num_inference_steps=st.integers(0, 2**32 - 1), guidance_scale=FLOATS,
    scheduler=st.integers(0, 12), seed=st.integers(0, 2**64 - 1),
    num_images=st.integers(0, 2**32 - 1), output_format=st.integers(0, 7),
    adapters=st.lists(st.builds(generator_pb2.AdapterRef, adapter_id=HOSTILE_TEXT,
                                scale=FLOATS, text_encoder_scale=FLOATS), max_size=3),
)  # fmt: skip


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    request=generate_requests,
    poison=st.integers(0, 5),
    adapter_id=HOSTILE_TEXT,
    uri=HOSTILE_TEXT,
    data=st.binary(max_size=512),
)
def test_generator_rejects_hostile_requests(generator_stub, request, poison, adapter_id, uri, data):
    _poison(request, poison)
    expect_client_error(generator_stub.Generate, request)
    expect_client_error(generator_stub.GenerateStream, request)
    expect_client_error(
        generator_stub.LoadAdapter, generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, uri=uri)
    )
    expect_client_error(
        generator_stub.LoadAdapter, generator_pb2.LoadAdapterRequest(adapter_id="fuzz", data=data)
    )
    expect_client_error(
        generator_stub.UnloadAdapter, generator_pb2.UnloadAdapterRequest(adapter_id=adapter_id)
    )


def test_servers_still_serve_after_the_fuzzing(servers, trainer_stub, generator_stub):
    for server in servers:
        assert health_status(server.target) == 1
    reply = generator_stub.Generate(
        generator_pb2.GenerateRequest(
            prompt="a red circle", width=32, height=32, num_inference_steps=3, seed=1
        ),
        timeout=60,
    )
    assert reply.images[0].data.startswith(b"\x89PNG")
    assert trainer_stub.ListJobs(trainer_pb2.ListJobsRequest()).jobs == [], "nothing queued"
    calls = sum(v for k, v in OUTCOMES.items() if " from " not in k)
    assert OUTCOMES["ok"] <= calls // 2  # most calls were refused
    print("hostile calls by outcome:", dict(OUTCOMES))
