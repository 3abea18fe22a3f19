"""The Generator gRPC edge: translates protobuf to pipeline and adapter-cache calls."""

from __future__ import annotations

import asyncio
import logging

import grpc
from loraforge.v1 import generator_pb2, generator_pb2_grpc

from loraforge_core.devices import resolve_device, validate_device
from loraforge_core.models import load_pipeline, resolve_model
from loraforge_core.settings import ServerSettings

log = logging.getLogger("loraforge.generator")


class GeneratorService:
    """Owns the warm pipeline; the servicer below is its gRPC face."""

    service_names = (generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,)

    def __init__(self, settings: ServerSettings) -> None:
        validate_device(settings.device)
        self.settings = settings
        self.pipeline = None

    def register(self, server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServicer_to_server(GeneratorServicer(self), server)

    async def start(self) -> None:
        device = resolve_device(self.settings.device)
        self.pipeline = await asyncio.to_thread(load_pipeline, self.settings.model, device=device)
        log.info(
            "pipeline loaded",
            extra={"model": resolve_model(self.settings.model), "device": str(device)},
        )

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, service: GeneratorService) -> None:
        self.service = service
