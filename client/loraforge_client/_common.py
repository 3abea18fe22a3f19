"""What the sync and asyncio clients share: channel options, credentials, request builders."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2

from loraforge_client.enums import (
    IMAGE_FORMATS,
    JOB_STATES,
    METHODS,
    SCHEDULERS,
    TEMPLATES,
    TRAINING_ENUMS,
)
from loraforge_client.errors import (
    REQUEST_ID_HEADER,
    RETRYABLE,
    JobFailedError,
    from_rpc_error,
)
from loraforge_client.routing import AffinityRouter, expand_targets
from loraforge_client.types import AdapterRef, Job, JobEvent

DEFAULT_TIMEOUT = 60.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TRAINING_OPTIONS = tuple(f.name for f in trainer_pb2.TrainingConfig.DESCRIPTOR.fields)


@dataclass
class TLS:
    """Server CA (PEM bytes) and, for mutual TLS, the client's certificate chain and key."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def channel_options(max_message_mb: int) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.lb_policy_name", "round_robin"),  # spread over every address a DNS name has
    ]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


_REQUEST_ID: ContextVar[str | None] = ContextVar("loraforge_request_id", default=None)


@contextmanager
def request_id(value: str) -> Iterator[str]:
    """Calls made inside (sync, or async in this task) carry ``value`` as their request id
    (``x-request-id``): the servers put it on every log line the call causes, the training
    process's included, and return it. Without one, each call gets a server-made id, which a
    failed call's error carries as ``request_id``."""
    reset = _REQUEST_ID.set(value)
    try:
        yield value
    finally:
        _REQUEST_ID.reset(reset)


def backoff_delays(retries: int, base: float = 0.25, cap: float = 8.0) -> list[float]:
    """Exponential backoff with full jitter."""
    return [random.uniform(0, min(cap, base * 2**i)) for i in range(retries)]


@dataclass
class ImageFile:
    data: bytes
    filename: str
    caption: str = ""
    mask: bytes = b""  # a loss mask: white = the subject


MASK_SUFFIX = ".mask"  # NAME.mask.png is NAME.png's mask (lora_pti's preprocessed layout)


def images_from_folder(folder: str | Path) -> list[ImageFile]:
    """Instance images of a folder, sorted by name; captions from ``NAME.txt`` and loss masks
    from ``NAME.mask.png`` (any image suffix) beside them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = [p for p in sorted(folder.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]  # fmt: skip
    masks = {p.stem[: -len(MASK_SUFFIX)]: p for p in files if p.stem.endswith(MASK_SUFFIX)}
    images = []
    for path in files:
        if path.stem.endswith(MASK_SUFFIX):
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        mask = masks[path.stem].read_bytes() if path.stem in masks else b""
        images.append(ImageFile(path.read_bytes(), path.name, caption, mask))
    if not images:
        raise FileNotFoundError(f"no PNG, JPEG or WebP images in {folder}")
    return images


def create_job_request(
    images: Iterable[ImageFile | bytes | str | Path],
    *,
    placeholder_tokens: Sequence[str] = ("<s1>",),
    initializer_tokens: Sequence[str] = (),
    template: str = "object",
    method: str = "pti",
    base_model: str = "",
    request_id: str | None = None,
    **options: Any,
) -> trainer_pb2.CreateJobRequest:
    """Build a CreateJobRequest; ``options`` are TrainingConfig fields (lora_rank=8, ...)."""
    unknown = sorted(set(options) - set(TRAINING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(unknown)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}")
    config = trainer_pb2.TrainingConfig()
    for name, value in options.items():
        if value is None:
            continue
        if name in TRAINING_ENUMS:
            value = TRAINING_ENUMS[name][value]
        if isinstance(value, (list, tuple)):
            getattr(config, name).extend(value)
        else:
            setattr(config, name, value)
    request = trainer_pb2.CreateJobRequest(
        request_id=request_id or uuid.uuid4().hex, base_model=base_model,
        method=METHODS[method], template=TEMPLATES[template],
        placeholder_tokens=list(placeholder_tokens),
        initializer_tokens=list(initializer_tokens), config=config,
    )  # fmt: skip
    for item in images:
        if isinstance(item, (str, Path)):
            item = ImageFile(Path(item).read_bytes(), Path(item).name)
        elif isinstance(item, bytes):
            item = ImageFile(item, "")
        request.instance_images.add(
            data=item.data, filename=item.filename, caption=item.caption, mask=item.mask
        )
    return request


def generate_request(
    prompt: str,
    *,
    adapters: Iterable[AdapterRef | tuple | str] = (),
    negative_prompt: str = "",
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    scheduler: str = "default",
    seed: int | None = None,
    num_images: int = 1,
    output_format: str = "png",
    init_image: bytes | str | Path | None = None,
    mask_image: bytes | str | Path | None = None,
    strength: float | None = None,
    max_sequence_length: int = 0,
) -> generator_pb2.GenerateRequest:
    """A GenerateRequest; with ``init_image`` (bytes or a file) img2img, and with
    ``mask_image`` too (white = repaint) inpainting; ``strength`` in [0, 1];
    ``max_sequence_length``: FLUX.1's T5 tokens per prompt (0: the model's)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}")
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {sorted(IMAGE_FORMATS)}")
    request = generator_pb2.GenerateRequest(
        prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
        num_inference_steps=steps, scheduler=SCHEDULERS[scheduler], num_images=num_images,
        output_format=IMAGE_FORMATS[output_format], max_sequence_length=max_sequence_length,
        adapters=[AdapterRef.coerce(a).to_proto() for a in adapters],
    )  # fmt: skip
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    if init_image is not None:
        request.init_image = _image_bytes(init_image)
    if mask_image is not None:
        request.mask_image = _image_bytes(mask_image)
    if strength is not None:
        request.strength = strength
    return request


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def load_adapter_request(
    adapter_id: str, source: str | Path | bytes, *, pin: bool = False, in_store: bool = False
) -> generator_pb2.LoadAdapterRequest:
    """From bytes, a bundle folder, a .safetensors/.tar file, a reference the server fetches
    (``hf://``, ``https://``, ``s3://``; ``adapter_id`` may be empty), or (``in_store``) a
    store path."""
    from loraforge_client.types import is_reference, pack_bundle

    request = generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=pin)
    if isinstance(source, bytes):
        request.data = source
    elif in_store or is_reference(str(source)):
        request.uri = str(source)
    else:
        path = Path(source)
        if path.is_dir():
            request.data = pack_bundle(path)
        elif path.is_file():
            request.data = path.read_bytes()
        else:
            raise FileNotFoundError(f"{path} is neither a bundle folder nor a file")
    return request


def routing_keys(request: generator_pb2.GenerateRequest) -> list[str]:
    """What a request's replica is picked by: its adapters' ids, or their references (one
    reference then goes to one replica, which fetches it once)."""
    return [a.adapter_id or a.source for a in request.adapters]


# ---------------------------------------------------------------------- what both twins share
class ClientBase:
    """Channel, credentials, deadline and retry budget; ``transport`` is ``grpc`` (sync) or
    ``grpc.aio``, which make channels with the same signatures."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 4,
        max_message_mb: int = 64,
        transport: Any = grpc,
    ) -> None:
        self._transport, self._tls = transport, tls
        self._options = channel_options(max_message_mb)
        self.channels = []
        self.channel = self._open(target)
        self._auth = call_metadata(token)
        self.timeout = timeout
        self.retries = retries

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Each call's metadata: the token, and the request id of an enclosing ``request_id``."""
        rid = _REQUEST_ID.get()
        return (*self._auth, (REQUEST_ID_HEADER, rid)) if rid else self._auth

    def _open(self, target: str) -> Any:
        """A channel to ``target`` with this client's credentials and options."""
        channel = (
            self._transport.secure_channel(target, self._tls.credentials(), self._options)
            if self._tls
            else self._transport.insecure_channel(target, self._options)
        )
        self.channels.append(channel)
        return channel

    def _retrying(self, retry: bool = True) -> Retrying:
        return Retrying(self.retries if retry else 0)


class Retrying:
    """One call's retries: transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) retry after an
    exponential backoff with jitter, or after the server's retry_after when it is longer."""

    def __init__(self, retries: int) -> None:
        self.delays = backoff_delays(retries)

    def delay_after(self, err: grpc.RpcError) -> float:
        """Seconds to wait before the next try; raises the typed error when none is left."""
        error = from_rpc_error(err)
        if err.code() not in RETRYABLE or not self.delays:
            raise error from None
        return max(self.delays.pop(0), getattr(error, "retry_after", None) or 0)


class WatchCursor:
    """A job's event stream across reconnects: resumes after the last sequence seen, so no
    event is missed or repeated; gives up after ``reconnect_for`` seconds unreachable."""

    RECONNECT_DELAY = 0.5

    def __init__(self, job_id: str, after_sequence: int, reconnect_for: float) -> None:
        self.job_id = job_id
        self.last = after_sequence
        self.reconnect_for = reconnect_for
        self.deadline: float | None = None

    def request(self) -> trainer_pb2.WatchJobRequest:
        return trainer_pb2.WatchJobRequest(job_id=self.job_id, after_sequence=self.last)

    def accept(self, message: trainer_pb2.JobEvent) -> JobEvent | None:
        """The event, or None for one already seen."""
        self.deadline = None
        if message.sequence <= self.last:
            return None
        self.last = message.sequence
        return JobEvent.from_proto(message)

    def delay_after(self, err: grpc.RpcError) -> float:
        """Seconds to wait before reconnecting; raises the typed error when the stream
        cannot go on."""
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            raise from_rpc_error(err) from None
        self.deadline = self.deadline or time.monotonic() + self.reconnect_for
        if time.monotonic() > self.deadline:
            raise from_rpc_error(err) from None
        return self.RECONNECT_DELAY


def finished_job(job: Job) -> Job:
    """The job if it succeeded; JobFailedError if it failed or was cancelled."""
    if job.state != "succeeded":
        raise JobFailedError(f"job {job.job_id} {job.state}: {job.failure_reason}", job)
    return job


def list_jobs_request(state: str | None, page_size: int, token: str) -> trainer_pb2.ListJobsRequest:
    return trainer_pb2.ListJobsRequest(
        page_size=page_size, page_token=token, state=JOB_STATES[state] if state else 0
    )


class GeneratorReplicas(ClientBase):
    """The generator replicas a client talks to, sync or async: one stub each and, for
    several, the router that orders them for a request's adapters (routing.py)."""

    def __init__(
        self, target: str | Sequence[str], *, affinity: bool | None = None, **kwargs: Any
    ) -> None:
        targets = expand_targets(target, affinity)
        super().__init__(targets[0], **kwargs)
        self.stub = generator_pb2_grpc.GeneratorStub(self.channel)
        self.router = AffinityRouter(targets) if len(targets) > 1 else None
        self.affinity = affinity is not False  # False: plain round robin over the replicas
        self.stubs = {targets[0]: self.stub}
        for other in targets[1:]:
            self.stubs[other] = generator_pb2_grpc.GeneratorStub(self._open(other))

    def _order(self, adapter_ids: list[str]) -> list[str]:
        """The replicas to try for a request naming ``adapter_ids``, best first."""
        assert self.router is not None
        return self.router.order(adapter_ids if self.affinity else [])

    def _stream_stub(self, adapter_ids: list[str]) -> Any:
        """The stub a stream goes to (a stream is not retried on another replica)."""
        return self.stub if self.router is None else self.stubs[self._order(adapter_ids)[0]]
