"""The Generator gRPC edge: protobuf in, engine calls on the one executor thread, protobuf out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from loraforge.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from prometheus_client import REGISTRY

from inference_service import metrics
from inference_service.adapter_store import DEFAULT_CACHE_BYTES, AdapterEntry
from inference_service.batching import BatchQueue, PendingGeneration
from inference_service.engine import GeneratorEngine
from inference_service.requests import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    MAX_INPUT_IMAGE_BYTES,
    AdapterRequest,
    GeneratedImage,
    GenerationJob,
    GenerationSpec,
    validate_adapter_id,
    validate_spec,
)
from loraforge_core.devices import resolve_device, validate_device
from loraforge_core.errors import InvalidArgument, ResourceExhausted, Unavailable
from loraforge_core.evaluation import to_proto as evaluation_to_proto
from loraforge_core.images import decode_image
from loraforge_core.models import load_pipeline, resolve_model
from loraforge_core.objectstore import open_object_store
from loraforge_core.protomaps import enum_names, enum_numbers
from loraforge_core.settings import ServerSettings

log = logging.getLogger("loraforge.generator")

SCHEDULER_NAMES = enum_names(generator_pb2.Scheduler, "SCHEDULER_", DEFAULT_SCHEDULER)
FORMATS = enum_names(common_pb2.ImageFormat, "IMAGE_FORMAT_", "png")
FORMAT_TO_PROTO = enum_numbers(common_pb2.ImageFormat, "IMAGE_FORMAT_")


def spec_from_request(request: generator_pb2.GenerateRequest) -> GenerationSpec:
    if request.scheduler not in SCHEDULER_NAMES:
        raise InvalidArgument(f"unknown scheduler {request.scheduler}", "scheduler")
    if request.output_format not in FORMATS:
        raise InvalidArgument(f"unknown format {request.output_format}", "output_format")
    init, mask = _image(request.init_image, "init_image"), _image(request.mask_image, "mask_image")
    spec = GenerationSpec(
        prompt=request.prompt, negative_prompt=request.negative_prompt,
        width=request.width or _multiple_of_8(init, 0), height=request.height or
        _multiple_of_8(init, 1), steps=request.num_inference_steps or DEFAULT_STEPS,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale")
        else DEFAULT_GUIDANCE,
        scheduler=SCHEDULER_NAMES[request.scheduler],
        seed=request.seed if request.HasField("seed") else random.randrange(2**31),
        num_images=request.num_images or 1, output_format=FORMATS[request.output_format],
        adapters=[
            AdapterRequest(
                a.adapter_id, a.scale if a.HasField("scale") else 1.0,
                a.text_encoder_scale if a.HasField("text_encoder_scale") else None,
                a.use_recommended_scale,
            )
            for a in request.adapters
        ],
        init_image=init, mask_image=mask.convert("L") if mask is not None else None,
        strength=request.strength if request.HasField("strength") else None,
    )  # fmt: skip
    validate_spec(spec)
    return spec


def _image(data: bytes, field_name: str):
    """A request's image, decoded (RGB), or None when it sent none."""
    if not data:
        return None
    if len(data) > MAX_INPUT_IMAGE_BYTES:
        raise InvalidArgument(f"larger than {MAX_INPUT_IMAGE_BYTES // 2**20} MiB", field_name)
    try:
        return decode_image(data)
    except ValueError as err:
        raise InvalidArgument(str(err), field_name) from None


def _multiple_of_8(image, axis: int) -> int:
    """An init image's width (axis 0) or height rounded down to a multiple of 8; 0: none."""
    return 0 if image is None else max(8, image.size[axis] // 8 * 8)


def adapter_to_proto(entry: AdapterEntry) -> generator_pb2.AdapterInfo:
    info = generator_pb2.AdapterInfo(
        adapter_id=entry.adapter_id, rank=entry.rank, tokens=entry.tokens,
        size_bytes=entry.size_bytes, sha256=entry.sha256, resident=entry.resident,
        pinned=entry.pinned, source_format=entry.source_format,
        has_text_encoder=entry.has_text_encoder, family=entry.family,
    )  # fmt: skip
    if entry.evaluation is not None:
        evaluation_to_proto(entry.evaluation, info.evaluation)
    return info


class GeneratorService:
    """Owns the warm pipeline, its executor and the request queue.

    Calls run on one thread in arrival order; which Generate requests share a denoising batch
    is batching.py's to decide (its docstring has the ordering rules).
    """

    service_names = (generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,)

    def __init__(
        self,
        settings: ServerSettings,
        *,
        max_resident_adapters: int = 8,
        queue_size: int = 16,
        preload: tuple[str, ...] = (),
        slot_rank: int = 16,
        extended_slots: bool = False,
        max_batch_images: int = 8,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        fuse_adapters: bool = True,
        compile_unet: bool = False,
    ) -> None:
        validate_device(settings.device)
        self.cache_bytes = cache_bytes
        self.fuse_adapters = fuse_adapters
        self.compile_unet = compile_unet
        self.queue = BatchQueue(max_images=max_batch_images, max_adapters=max_resident_adapters)
        self.settings = settings
        self.max_resident = max_resident_adapters
        self.queue_size = queue_size
        self.preload = preload
        self.slot_rank = slot_rank
        self.extended_slots = extended_slots
        self.engine: GeneratorEngine | None = None
        # One thread owns the pipeline: requests run one at a time, in arrival order.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self.waiting = 0  # calls admitted and not yet answered
        self.running = 0  # of which in the batch being denoised
        self.draining = False
        self.collector = metrics.GeneratorCollector(
            waiting=lambda: max(0, self.waiting - self.running), running=lambda: self.running,
            adapters=lambda: self.engine.adapters if self.engine is not None else None,
        )  # fmt: skip

    def register(self, server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self), server)

    async def start(self) -> None:
        REGISTRY.register(self.collector)
        device = resolve_device(self.settings.device)
        pipe = await asyncio.to_thread(load_pipeline, self.settings.model, device=device)
        objects = await asyncio.to_thread(
            open_object_store, self.settings.artifact_store, Path(self.settings.data_dir)
        )
        self.engine = GeneratorEngine(
            pipe, Path(self.settings.data_dir), max_resident=self.max_resident,
            model_name=self.settings.model or "loraforge/tiny", slot_rank=self.slot_rank,
            extended_slots=self.extended_slots, objects=objects, cache_bytes=self.cache_bytes,
            fuse_adapters=self.fuse_adapters,
            compile_backend="inductor" if self.compile_unet else None,
        )  # fmt: skip
        for adapter_id in self.preload:
            await self.run(self.engine.adapters.register, adapter_id, pin=True)
        log.info(
            "pipeline loaded",
            extra={"model": resolve_model(self.settings.model), "device": str(device)},
        )

    def _admit(self) -> None:
        if self.draining:
            metrics.REJECTED.labels("draining").inc()
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.waiting >= self.queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise ResourceExhausted(
                f"{self.waiting} requests are waiting (queue of {self.queue_size}); retry later",
                retry_after_seconds=1.0,
            )

    async def _on_pipeline_thread(self, fn: Callable):
        def guarded():
            # Requests still queued when a drain starts are refused; the running one finishes.
            if self.draining:
                metrics.REJECTED.labels("draining").inc()
                raise Unavailable("the server is shutting down; retry on another replica")
            return fn()

        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, guarded)
        finally:
            self.waiting -= 1

    async def run(self, fn, *args, **kwargs):
        """Run fn on the pipeline thread, behind the bounded queue (a barrier to batching)."""
        self._admit()
        ticket = self.queue.add_barrier()

        def call():
            self.queue.lift_barrier(ticket)
            return fn(*args, **kwargs)

        try:
            return await self._on_pipeline_thread(call)
        finally:
            self.queue.lift_barrier(ticket)

    async def generate(self, job: GenerationJob) -> list[GeneratedImage]:
        """Queue a Generate request; whichever batch takes it first serves it."""
        self._admit()
        item = self.queue.add(job)
        try:
            await self._on_pipeline_thread(lambda: self._serve_next_batch(item.ticket))
        except Exception:
            if not item.result.done():  # a drain refuses this turn, yet an earlier batch
                raise  # may have served the request already: then its images are returned
        finally:
            self.queue.discard(item)  # refused on drain, or the caller went away
        # Served by now: each queued request's turn serves the oldest waiting one (if it is
        # not younger than the turn), so by this request's own turn it has been taken.
        return item.result.result(timeout=0)

    def _serve_next_batch(self, turn: int) -> None:
        batch: list[PendingGeneration] = self.queue.take(turn)
        if not batch:
            return
        self.running = len(batch)
        try:
            outcomes = self.engine_or_raise().generate_batch([item.job for item in batch])
        except Exception as err:
            outcomes = [err] * len(batch)
        finally:
            self.running = 0
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                item.result.set_exception(outcome)
            else:
                item.result.set_result(outcome)

    def engine_or_raise(self) -> GeneratorEngine:
        if self.engine is None:
            raise Unavailable("the model is still loading (health: NOT_SERVING); retry shortly")
        return self.engine

    async def drain(self) -> None:
        self.draining = True

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self.collector)


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, service: GeneratorService) -> None:
        self.service = service

    @property
    def engine(self) -> GeneratorEngine:
        return self.service.engine_or_raise()

    async def _generate(self, request, context, on_step=lambda step, total: None):
        spec = spec_from_request(request)
        cancelled = threading.Event()
        context.add_done_callback(lambda _: cancelled.set())
        self.service.engine_or_raise()  # UNAVAILABLE until the model is loaded
        images = await self.service.generate(GenerationJob(spec, on_step, cancelled.is_set))
        return [
            common_pb2.Image(data=i.data, format=FORMAT_TO_PROTO[i.format], width=i.width,
                             height=i.height, seed=i.seed)
            for i in images
        ]  # fmt: skip

    async def Generate(self, request, context):
        return generator_pb2.GenerateResponse(images=await self._generate(request, context))

    async def GenerateStream(self, request, context) -> AsyncIterator:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, (step, total))

        task = asyncio.create_task(self._generate(request, context, on_step))
        while not task.done() or not updates.empty():
            getter = asyncio.create_task(updates.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                step, total = getter.result()
                yield generator_pb2.GenerateStreamResponse(
                    progress=generator_pb2.GenerateProgress(step=step, total_steps=total)
                )
            else:
                getter.cancel()
        for image in task.result():
            yield generator_pb2.GenerateStreamResponse(image=image)

    async def LoadAdapter(self, request, context):
        validate_adapter_id(request.adapter_id, "adapter_id")
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgument("give a uri in the artifact store or the file's bytes", "source")
        entry = await self.service.run(
            self.engine.adapters.register, request.adapter_id,
            data=request.data if source == "data" else None,
            uri=request.uri if source == "uri" else "", pin=request.pin,
        )  # fmt: skip
        return adapter_to_proto(entry)

    async def UnloadAdapter(self, request, context):
        validate_adapter_id(request.adapter_id, "adapter_id")
        await self.service.run(self.engine.adapters.unload, request.adapter_id)
        return generator_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        # The registry's lock may be held by the pipeline thread (a load): wait off the loop.
        entries = await asyncio.to_thread(self.engine.adapters.list)
        return generator_pb2.ListAdaptersResponse(adapters=[adapter_to_proto(e) for e in entries])
