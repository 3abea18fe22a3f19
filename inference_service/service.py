"""The generator service's domain side, which the gRPC servicer (server.py) calls: the warm
pipeline loaded at start, Generate requests batched on the one pipeline thread, adapters made
resident, unloaded and listed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from prometheus_client import REGISTRY

from inference_service import metrics
from inference_service.adapter_sources import DEFAULT_CACHE_BYTES, AdapterEntry
from inference_service.batching import PipelineTurns
from inference_service.engine import GeneratorEngine, build_engine
from inference_service.fetching import FetchPolicy
from inference_service.spec import GeneratedImage, GenerationJob
from loraforge_core.devices import resolve_device, validate_device
from loraforge_core.errors import Unavailable
from loraforge_core.models import load_pipeline, resolve_model
from loraforge_core.objectstore import open_object_store
from loraforge_core.settings import ServerSettings

log = logging.getLogger("loraforge.generator")


class GeneratorService:
    """The generator's domain side: the warm engine, and every call on it taken in turn on the
    one pipeline thread (batching.PipelineTurns, whose module has the ordering rules).
    ``server.GeneratorServicer`` is its gRPC face."""

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
        compile_denoiser: bool = False,
        fetch_policy: FetchPolicy | None = None,
    ) -> None:
        validate_device(settings.device)
        self.fetch_policy = fetch_policy or FetchPolicy()
        self.cache_bytes = cache_bytes
        self.fuse_adapters = fuse_adapters
        self.compile_denoiser = compile_denoiser
        self.turns = PipelineTurns(
            queue_size=queue_size, max_images=max_batch_images,
            max_adapters=max_resident_adapters,
        )  # fmt: skip
        self.settings = settings
        self.max_resident = max_resident_adapters
        self.preload = preload
        self.slot_rank = slot_rank
        self.extended_slots = extended_slots
        self.engine: GeneratorEngine | None = None
        turns = self.turns
        self.collector = metrics.GeneratorCollector(
            waiting=lambda: max(0, turns.waiting - turns.running), running=lambda: turns.running,
            residency=lambda: None if self.engine is None else self.engine.adapters.residency(),
        )  # fmt: skip

    async def start(self) -> None:
        REGISTRY.register(self.collector)
        device = resolve_device(self.settings.device)
        pipe = await asyncio.to_thread(load_pipeline, self.settings.model, device=device)
        objects = await asyncio.to_thread(
            open_object_store, self.settings.artifact_store, Path(self.settings.data_dir)
        )
        self.engine = build_engine(
            pipe, Path(self.settings.data_dir), max_resident=self.max_resident,
            model_name=self.settings.model or "loraforge/tiny", slot_rank=self.slot_rank,
            extended_slots=self.extended_slots, objects=objects, cache_bytes=self.cache_bytes,
            fuse_adapters=self.fuse_adapters,
            compile_backend="inductor" if self.compile_denoiser else None,
            fetch_policy=self.fetch_policy,
        )  # fmt: skip
        for adapter_id in self.preload:
            await self.turns.run(self.engine.adapters.register, adapter_id, pin=True)
        log.info(
            "pipeline loaded",
            extra={"model": resolve_model(self.settings.model), "device": str(device)},
        )

    async def generate(self, job: GenerationJob) -> list[GeneratedImage]:
        """Serve a Generate request in the first batch that takes it (the queue plans the
        batches: batching.BatchQueue.take)."""
        engine = self.engine_or_raise()  # UNAVAILABLE until the model is loaded
        cold = [(a.adapter_id, a.source) for a in job.spec.adapters]
        await asyncio.to_thread(engine.adapters.fetch_cold, cold)
        return await self.turns.generate(job, engine.serve_batch)

    async def load_adapter(
        self, adapter_id: str, *, data: bytes | None = None, uri: str = "", pin: bool = False
    ) -> AdapterEntry:
        """Make an adapter resident, from pushed ``data`` or ``uri`` in the artifact store (its
        id when empty), on its turn."""
        adapters = self.engine_or_raise().adapters
        if data is None:
            await asyncio.to_thread(adapters.fetch_cold, [(adapter_id, uri)])
        return await self.turns.run(adapters.register, adapter_id, data=data, uri=uri, pin=pin)

    async def unload_adapter(self, adapter_id: str) -> None:
        await self.turns.run(self.engine_or_raise().adapters.unload, adapter_id)

    async def list_adapters(self) -> list[AdapterEntry]:
        # The registry's lock may be held by the pipeline thread (a load): wait off the loop.
        return await asyncio.to_thread(self.engine_or_raise().adapters.list)

    def engine_or_raise(self) -> GeneratorEngine:
        if self.engine is None:
            raise Unavailable("the model is still loading (health: NOT_SERVING); retry shortly")
        return self.engine

    async def drain(self) -> None:
        self.turns.drain()

    async def close(self) -> None:
        self.turns.close()
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self.collector)
