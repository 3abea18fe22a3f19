"""Hostile input (hypothesis) through the real paths: valid requests carrying hostile content,
real job and artifact ids, crafted safetensors files and bundle archives.

Each RPC's requests come in two families: built valid (they must succeed and reach the engine,
the job store or the adapter importer) and built with one bad field (they must get a client
error naming it). No answer may be INTERNAL or UNKNOWN, and the servers still serve afterwards.
The per-RPC tally (sent, valid, reached, status codes) is printed at the end.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loraforge.v1 import (
    common_pb2,
    generator_pb2,
    generator_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from PIL import Image
from safetensors.torch import save

from inference_service.spec import MAX_PROMPT_CHARS, MAX_SCALE, RESERVED_TOKEN_PREFIX
from loraforge_core import bundle as bundles
from loraforge_core.launch import ServerProcess, health_status
from tests.helpers import random_bundle, shape_png
from trainer_service.proto_mapping import MAX_CHUNK_SIZE, MAX_PAGE_SIZE, MIN_CHUNK_SIZE

CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
}  # fmt: skip
EXAMPLES = 100
TALLY: defaultdict[str, Counter[str]] = defaultdict(Counter)
FUZZ = settings(  # derandomized: CI runs the same examples every time
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
TOKENS = ("<fz1>", "<fz2>")
ADAPTERS = ("fuzz-a", "fuzz-b")


# ------------------------------------------------------------------------------ the tally
def send(
    rpc: Callable[..., Any], request: Any, *, valid: bool,
    reached: Callable[[grpc.RpcError | None], bool] = lambda err: err is None,
) -> Any:  # fmt: skip
    """Call ``rpc``; a valid request must succeed, an invalid one get a client error."""
    name = rpc._method.decode().rsplit("/", 1)[-1]
    tally = TALLY[name]
    tally["sent"] += 1
    tally["valid"] += valid
    try:
        result = rpc(request, timeout=60)
        if not hasattr(result, "ListFields"):  # a stream
            result = list(result)
    except grpc.RpcError as err:
        tally[err.code().name] += 1
        tally["reached"] += reached(err)
        assert err.code() in CLIENT_ERRORS, (name, err.code(), err.details())
        assert "Traceback" not in (err.details() or "")
        assert not valid, (name, "a valid request was refused", err.code(), err.details())
        return None
    tally["OK"] += 1
    tally["reached"] += reached(None)
    assert valid, (name, "an invalid request succeeded", request)
    return result


def print_tally() -> None:
    print("\nRPC                 sent valid reached  status codes")
    for rpc, counts in sorted(TALLY.items()):
        codes = {k: v for k, v in counts.items() if k not in ("sent", "valid", "reached")}
        print(f"{rpc:<19} {counts['sent']:>4} {counts['valid']:>5} {counts['reached']:>7}  {codes}")


# ------------------------------------------------------------------------------ content
HOSTILE_TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from([
        "../../etc/passwd", "/etc/passwd", "..", ".", "\x00", "%s%n%x", "' OR 1=1 --", "CON",
        "\u202eevil\u202c", "\u200b\u200d", "😀" * 50, "<|endoftext|>", "</w>", "\r\n\t",
        "<fz1>" * 120, "<fz2> <fz1>", "x" * MAX_PROMPT_CHARS, "a photo of <fz1>",
    ]),
)  # fmt: skip
PROMPTS = HOSTILE_TEXT.filter(lambda t: t.strip() and RESERVED_TOKEN_PREFIX not in t)
NEGATIVES = HOSTILE_TEXT.filter(lambda t: RESERVED_TOKEN_PREFIX not in t)


def image_bytes(mode: str, size: tuple[int, int], fmt: str, exif_rotate: bool = False) -> bytes:
    image = Image.new("RGB", size, "red").convert(mode)
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90
        kwargs["exif"] = exif
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# Unusual but valid: palettes, 16-bit, alpha, CMYK, EXIF rotation, extreme aspect, the minimum.
ODD_IMAGES = [
    image_bytes("P", (33, 17), "PNG"), image_bytes("LA", (16, 16), "PNG"),
    image_bytes("I;16", (20, 20), "PNG"), image_bytes("1", (9, 9), "PNG"),
    image_bytes("CMYK", (24, 24), "JPEG"), image_bytes("L", (8, 8), "JPEG"),
    image_bytes("RGB", (40, 24), "JPEG", exif_rotate=True), image_bytes("RGBA", (8, 900), "WEBP"),
    shape_png("blue", size=64),
]  # fmt: skip


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


BAD_IMAGES = st.one_of(
    st.binary(max_size=256),
    st.builds(png_bomb, st.integers(5000, 2**31 - 1), st.integers(5000, 2**31 - 1)),
    st.sampled_from([
        b"", shape_png()[:40], b"GIF89a" + b"\x00" * 40, image_bytes("RGB", (7, 64), "PNG"),
        image_bytes("RGB", (16, 16), "GIF"), image_bytes("RGB", (16, 16), "BMP"),
    ]),
)  # fmt: skip


# ------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess, dict[str, Any]]]:
    """A trainer that has trained one job (real job and artifact ids), restarted as an API-only
    replica (--max-jobs 0: fuzzed jobs are stored but never trained), and a generator holding
    two real adapters with learned tokens."""
    data = tmp_path_factory.mktemp("hostile")
    known: dict[str, Any] = {}
    with (
        ServerProcess("trainer", data_dir=data / "t", model=str(tiny_model)) as trainer,
        grpc.insecure_channel(trainer.target) as channel,
    ):
        stub = trainer_pb2_grpc.TrainerStub(channel)
        job = stub.CreateJob(valid_job(steps=2), timeout=30)
        list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
        assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
        known["trained_job"] = job.job_id
        known["artifacts"] = [job.final_artifact_id, *job.checkpoint_artifact_ids]
    bundle_paths = [
        random_bundle(str(tiny_model), data / "bundles", seed=i, token=token).path
        for i, token in enumerate(TOKENS)
    ]
    known["bundle"] = bundle_paths[0]
    with (
        ServerProcess("trainer", data_dir=data / "t", model=str(tiny_model),
                      extra_args=["--max-jobs", "0"]) as trainer,
        ServerProcess("generator", data_dir=data / "g", model=str(tiny_model)) as generator,
        grpc.insecure_channel(generator.target) as channel,
    ):  # fmt: skip
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for adapter_id, path in zip(ADAPTERS, bundle_paths, strict=True):
            stub.LoadAdapter(
                generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, data=bundles.pack(path)),
                timeout=60,
            )
        known["generator_dir"] = data / "g"
        yield trainer, generator, known
    print_tally()


@pytest.fixture(scope="module")
def trainer_stub(servers) -> Iterator[trainer_pb2_grpc.TrainerStub]:
    with grpc.insecure_channel(servers[0].target) as channel:
        yield trainer_pb2_grpc.TrainerStub(channel)


@pytest.fixture(scope="module")
def generator_stub(servers) -> Iterator[generator_pb2_grpc.GeneratorStub]:
    with grpc.insecure_channel(servers[1].target) as channel:
        yield generator_pb2_grpc.GeneratorStub(channel)


# ------------------------------------------------------------------------------ trainer
def valid_job(steps: int = 4, **fields: Any) -> trainer_pb2.CreateJobRequest:
    request = trainer_pb2.CreateJobRequest(
        method=trainer_pb2.TRAINING_METHOD_PTI, placeholder_tokens=["<s1>"],
        initializer_tokens=["circle"],
        instance_images=[trainer_pb2.InstanceImage(data=shape_png(), filename="red.png")],
        config=trainer_pb2.TrainingConfig(max_train_steps_ti=steps, max_train_steps_tuning=steps,
                                          save_steps=1, seed=1),
    )  # fmt: skip
    for name, value in fields.items():
        request.ClearField(name)
        if isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


valid_jobs = st.builds(
    lambda request_id, token, init, images, captions, names, prompt, resolution, rank, seed: (
        valid_job(request_id=request_id, placeholder_tokens=[token], initializer_tokens=[init],
                  instance_images=[trainer_pb2.InstanceImage(data=d, caption=c, filename=n)
                                   for d, c, n in zip(images, captions, names, strict=True)]),
        prompt, resolution, rank, seed,
    ),
    request_id=st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)),
    token=st.sampled_from(["<s1>", "<ü>", "<\u202e>", "<'OR-1=1>", "<%s%n>", "<" + "x" * 32 + ">",
                           "<😀>", "<a|b>"]),
    init=st.sampled_from(["circle", "<zero>", "<rand-0.5>", "ünïcödé", "😀", "</w>"]),
    images=st.lists(st.sampled_from(ODD_IMAGES), min_size=3, max_size=3),
    captions=st.lists(st.text(max_size=1000), min_size=3, max_size=3),
    names=st.lists(HOSTILE_TEXT, min_size=3, max_size=3),
    prompt=HOSTILE_TEXT,
    resolution=st.sampled_from([None, 8, 512, 2048]),
    rank=st.sampled_from([1, 128]),
    seed=st.sampled_from([0, 2**63 - 1]),
)  # fmt: skip


def _poison_job(request: trainer_pb2.CreateJobRequest, which: int, junk: bytes, text: str) -> None:
    """One bad field; the rest stays valid."""
    if which == 0:
        request.instance_images[0].data = junk
    elif which == 1:
        request.placeholder_tokens[0] = text if not text.startswith("<") else "no brackets"
    elif which == 2:
        request.config.lora_rank = 2**31
    elif which == 3:
        request.config.learning_rate_unet = math.nan
    elif which == 4:
        request.request_id = "bad id " + text
    else:
        request.config.resolution = 12


@pytest.mark.slow
def test_trainer_real_paths_under_hostile_content(servers, trainer_stub):
    @FUZZ
    @given(
        job=valid_jobs,
        poison=st.integers(0, 5),
        junk=BAD_IMAGES,
        text=HOSTILE_TEXT,
        after=st.sampled_from([0, 1, 3, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
        page=st.tuples(
            st.integers(0, 2 * MAX_PAGE_SIZE), st.sampled_from(["", "0", "1", "-1", "9" * 30, "x"])
        ),
        chunk=st.sampled_from([0, 1, 100, 4096, 2**20, 4 * 2**20, 2**32 - 1]),
    )
    def fuzz(job, poison, junk, text, after, page, chunk) -> None:
        trainer_example(servers[2], trainer_stub, job, poison, junk, text, after, page, chunk)

    fuzz()
    created = TALLY["CreateJob"]
    assert created["OK"] == created["valid"] >= EXAMPLES  # every valid job was stored
    assert TALLY["WatchJob"]["reached"] >= EXAMPLES  # replayed the events of real jobs
    assert TALLY["DownloadArtifact"]["reached"] > 0  # streamed real artifacts
    assert_no_server_errors()


def trainer_example(known, trainer_stub, job, poison, junk, text, after, page, chunk) -> None:
    request, prompt, resolution, rank, seed = job
    request.config.validation_prompt = prompt
    if resolution is not None:  # optional: unset means the model's size
        request.config.resolution = resolution
    request.config.lora_rank = rank
    request.config.seed = seed
    job_id = send(trainer_stub.CreateJob, request, valid=True).job_id
    known.setdefault("fuzzed_jobs", set()).add(job_id)
    # A real job: read it, cancel it (it stays stored), then replay its events from anywhere.
    send(trainer_stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id), valid=True)
    send(trainer_stub.CancelJob, trainer_pb2.CancelJobRequest(job_id=job_id), valid=True)
    events = send(
        trainer_stub.WatchJob,
        trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after),
        valid=True,
    )
    assert all(e.sequence > after for e in events)
    size, token = page
    send(
        trainer_stub.ListJobs,
        trainer_pb2.ListJobsRequest(page_size=size, page_token=token),
        valid=size <= MAX_PAGE_SIZE and token in ("", "0", "1"),
    )
    artifact_id = known["artifacts"][after % len(known["artifacts"])]
    send(trainer_stub.GetArtifact, trainer_pb2.GetArtifactRequest(artifact_id=artifact_id),
         valid=True)  # fmt: skip
    send(
        trainer_stub.DownloadArtifact,
        trainer_pb2.DownloadArtifactRequest(artifact_id=artifact_id, chunk_size=chunk),
        valid=chunk == 0 or MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE,
        reached=lambda err: err is None,
    )
    bad = valid_job()
    _poison_job(bad, poison, junk, text)
    send(trainer_stub.CreateJob, bad, valid=False)
    for rpc, message in (
        (trainer_stub.GetJob, trainer_pb2.GetJobRequest(job_id=text)),
        (trainer_stub.WatchJob, trainer_pb2.WatchJobRequest(job_id=text)),
        (trainer_stub.GetArtifact, trainer_pb2.GetArtifactRequest(artifact_id=text)),
    ):
        send(rpc, message, valid=False, reached=lambda err: False)


# ------------------------------------------------------------------------------ generator
valid_generations = st.builds(
    generator_pb2.GenerateRequest,
    prompt=PROMPTS, negative_prompt=NEGATIVES,
    width=st.sampled_from([0, 8, 16, 24, 40]), height=st.sampled_from([0, 8, 16, 24, 40]),
    num_inference_steps=st.integers(1, 2),
    guidance_scale=st.one_of(st.sampled_from([0.0, 1.0, 50.0]), st.floats(0, 50)),
    scheduler=st.sampled_from(list(generator_pb2.Scheduler.values())),
    output_format=st.sampled_from(list(common_pb2.ImageFormat.values())),
    num_images=st.integers(1, 2),
    seed=st.one_of(st.integers(0, 2**64 - 3), st.just(2**64 - 3)),
    adapters=st.lists(
        st.builds(generator_pb2.AdapterRef, adapter_id=st.sampled_from(ADAPTERS),
                  scale=st.sampled_from([0.0, -MAX_SCALE, MAX_SCALE, 1.0, 1e-30]),
                  text_encoder_scale=st.sampled_from([0.0, -MAX_SCALE, MAX_SCALE, 0.5])),
        max_size=2, unique_by=lambda a: a.adapter_id),
)  # fmt: skip


def _poison_generation(request: generator_pb2.GenerateRequest, which: int, text: str) -> None:
    if which == 0:
        request.width = 33
    elif which == 1:
        request.num_inference_steps = 10_000
    elif which == 2:
        request.adapters.add(adapter_id="../" + text, scale=1.0)
    elif which == 3:
        request.adapters.add(adapter_id="ok-id", scale=float("nan"))
    elif which == 4:
        request.prompt = RESERVED_TOKEN_PREFIX + text
    else:
        request.seed, request.num_images = 2**64 - 1, 2


@pytest.mark.slow
def test_generator_renders_valid_requests_with_hostile_content(generator_stub):
    @FUZZ
    @given(request=valid_generations, poison=st.integers(0, 5), text=HOSTILE_TEXT)
    def fuzz(request, poison, text) -> None:
        generation_example(generator_stub, request, poison, text)

    fuzz()
    for rpc in ("Generate", "GenerateStream"):
        assert TALLY[rpc]["OK"] == TALLY[rpc]["valid"] >= EXAMPLES, dict(TALLY[rpc])
    assert_no_server_errors()


def generation_example(generator_stub, request, poison, text) -> None:
    reply = send(generator_stub.Generate, request, valid=True)
    assert [i.seed for i in reply.images] == [request.seed + i for i in range(request.num_images)]
    assert all(i.data for i in reply.images)
    streamed = send(generator_stub.GenerateStream, request, valid=True)
    assert [m.image.seed for m in streamed if m.WhichOneof("kind") == "image"] == [
        i.seed for i in reply.images
    ]
    bad = generator_pb2.GenerateRequest()
    bad.CopyFrom(request)
    _poison_generation(bad, poison, text)
    send(generator_stub.Generate, bad, valid=False, reached=lambda err: False)


# ---- crafted files: every one passes the format sniff and reaches the importer
def raw_safetensors(
    header: dict[str, Any] | bytes, payload: bytes = b"", length: int = -1
) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length < 0 else length
    return struct.pack("<Q", size) + text + payload


def lora_file(state: dict[str, torch.Tensor]) -> bytes:
    return save(state)


LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CRAFTED_FILES = [
    raw_safetensors(b"{" + b" " * 64, length=2**63),  # header length far past the file
    raw_safetensors(b"{" + b" " * 64, length=2**64 - 1),
    raw_safetensors(b"{not json at all}"),
    raw_safetensors(b"[1, 2, 3]"),
    raw_safetensors({"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    raw_safetensors({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
                    b"\0" * 4),
    raw_safetensors({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    raw_safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**62]}}, b"\0" * 4),
    raw_safetensors({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
    raw_safetensors({"__metadata__": {"a": 1}, "x": {"dtype": "F32", "shape": [1],
                                                     "data_offsets": [0, 4]}}, b"\0" * 4),
    lora_file({"unrelated.weight": torch.zeros(2)}),
    lora_file({f"{LORA_KEY}.lora_down.weight": torch.zeros(4, 7),  # wrong in_features
               f"{LORA_KEY}.lora_up.weight": torch.zeros(32, 4)}),
    lora_file({f"{LORA_KEY}.lora_down.weight": torch.zeros(4),  # 1-D
               f"{LORA_KEY}.lora_up.weight": torch.zeros(4)}),
    lora_file({f"{LORA_KEY}.lora_down.weight": torch.zeros(4, 32, dtype=torch.int8),
               f"{LORA_KEY}.lora_up.weight": torch.zeros(32, 4, dtype=torch.int8)}),
    lora_file({f"{LORA_KEY}.lora_down.weight": torch.full((4, 32), math.nan),
               f"{LORA_KEY}.lora_up.weight": torch.full((32, 4), math.inf)}),
    lora_file({f"{LORA_KEY}.lora_down.weight": torch.zeros(4, 32)}),  # half a pair
    lora_file({"unet:0:up": torch.zeros(32, 4), "unet:0:down": torch.zeros(4, 999)}),
    lora_file({"lora_te_../../x.lora_down.weight": torch.zeros(4, 32),
               "lora_te_../../x.lora_up.weight": torch.zeros(32, 4)}),
    lora_file({"bundle_emb.<x>.string_to_param.*": torch.zeros(1, 3),
               f"{LORA_KEY}.lora_down.weight": torch.zeros(4, 32),
               f"{LORA_KEY}.lora_up.weight": torch.zeros(32, 4)}),
]  # fmt: skip


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def crafted_archives(bundle_dir: Path) -> list[bytes]:
    files = {name: (bundle_dir / name).read_bytes() for name in bundles.BUNDLE_FILES}

    def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        return info

    def with_file(name: str, data: bytes, *, renamed: str = "", kind: bytes = tarfile.REGTYPE,
                  link: str = "") -> bytes:  # fmt: skip
        members = [(member(n), d) for n, d in files.items() if n != name]
        return tar_of([*members, (member(renamed or name, kind, link), data)])

    def manifest(**changes: Any) -> dict[str, bytes]:
        """A bundle whose manifest is hostile but whose hashes are right (it passes sha256)."""
        data = json.loads(files[bundles.MANIFEST_FILE])
        data.update(changes)
        return {**files, bundles.MANIFEST_FILE: json.dumps(data).encode()}

    lora = bundles.LORA_FILE
    return [
        with_file(lora, b"", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        with_file(lora, b"", kind=tarfile.LNKTYPE, link="/etc/passwd"),
        with_file(lora, files[lora], renamed="../" + lora),
        with_file(lora, files[lora], renamed="/tmp/" + lora),
        with_file(lora, files[lora], renamed="./" + lora),
        with_file(lora, b"", kind=tarfile.CHRTYPE),
        with_file(lora, b"", kind=tarfile.FIFOTYPE),
        with_file(lora, b"", kind=tarfile.DIRTYPE),
        tar_of([*((member(n), d) for n, d in files.items()), (member("extra"), b"x")]),
        tar_of([*((member(n), d) for n, d in files.items()), (member(lora), files[lora])]),
        with_file(lora, files[lora][:-10] + b"\0" * 10),  # sha256 no longer matches
        with_file(lora, files[lora])[:1024],  # truncated archive
        tar_of([(member(n), d) for n, d in manifest(tokens=["<|lf0|>", "\x00"]).items()]),
        tar_of([(member(n), d) for n, d in manifest(rank=-5, text_hidden_size=10**12).items()]),
        tar_of([(member(n), d) for n, d in manifest(format_version=10**9).items()]),
        tar_of([(member(n), d) for n, d in manifest(files={}).items()]),
        tar_of([(member(n), d) for n, d in {**files, bundles.MANIFEST_FILE: b"[]"}.items()]),
    ]


def not_sniffed(err: grpc.RpcError | None) -> bool:
    return err is None or "give a bundle archive" not in (err.details() or "")


@pytest.mark.slow
def test_generator_imports_crafted_files_and_archives_cleanly(servers, generator_stub):
    files = CRAFTED_FILES + crafted_archives(servers[2]["bundle"])

    @FUZZ
    @given(
        which=st.integers(0, len(files) - 1),  # an index: a readable falsifying example
        adapter_id=st.from_regex(r"fz-[A-Za-z0-9._-]{0,125}", fullmatch=True),  # any valid id
        uri=HOSTILE_TEXT,
    )
    def fuzz(which, adapter_id, uri) -> None:
        # A real adapter under a fuzzed id, as an archive or a plain LoRA file: it loads.
        real = servers[2]["bundle"]
        data = bundles.pack(real) if which % 2 else (real / bundles.LORA_FILE).read_bytes()
        send(
            generator_stub.LoadAdapter,
            generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, data=data),
            valid=True,
        )
        send(
            generator_stub.UnloadAdapter,
            generator_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
            valid=True,
        )
        send(
            generator_stub.LoadAdapter,
            generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, data=files[which]),
            valid=False,
            reached=not_sniffed,
        )
        send(
            generator_stub.LoadAdapter,
            generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, uri=uri),
            valid=False,
            reached=lambda err: False,
        )

    fuzz()
    for crafted in files:  # and each crafted input once, whatever hypothesis drew
        send(generator_stub.LoadAdapter,
             generator_pb2.LoadAdapterRequest(adapter_id="fz-each", data=crafted),
             valid=False, reached=not_sniffed)  # fmt: skip
    loads = TALLY["LoadAdapter"]
    assert loads["OK"] == loads["valid"] >= EXAMPLES
    assert loads["reached"] >= loads["valid"] + len(files)  # no crafted input stopped at the sniff
    assert_no_server_errors()


def assert_no_server_errors() -> None:
    for rpc, counts in TALLY.items():
        assert counts["INTERNAL"] == counts["UNKNOWN"] == 0, (rpc, dict(counts))


def test_store_paths_cannot_leave_the_data_dir_through_a_symlink(servers, generator_stub, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes((servers[2]["bundle"] / bundles.LORA_FILE).read_bytes())
    link = servers[2]["generator_dir"] / "link"
    link.symlink_to(outside)
    with pytest.raises(grpc.RpcError) as caught:
        generator_stub.LoadAdapter(
            generator_pb2.LoadAdapterRequest(adapter_id="escape", uri="link/x.safetensors")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "escapes" in caught.value.details()


def test_servers_still_serve_after_the_fuzzing(servers, trainer_stub, generator_stub):
    for server in servers[:2]:
        assert health_status(server.target) == 1
    reply = generator_stub.Generate(
        generator_pb2.GenerateRequest(prompt="a red circle <fz1>", width=32, height=32,
                                      num_inference_steps=3, seed=1,
                                      adapters=[generator_pb2.AdapterRef(adapter_id="fuzz-a",
                                                                         scale=1.0)]),
        timeout=60,
    )  # fmt: skip
    assert reply.images[0].data.startswith(b"\x89PNG")
    trained = trainer_stub.GetJob(trainer_pb2.GetJobRequest(job_id=servers[2]["trained_job"]))
    assert trained.state == trainer_pb2.JOB_STATE_SUCCEEDED
    for job_id in servers[2].get("fuzzed_jobs", ()):  # stored and cancelled, never trained
        job = trainer_stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id))
        assert job.state == trainer_pb2.JOB_STATE_CANCELLED and not job.started_at.seconds
