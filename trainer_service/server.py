"""The Trainer gRPC edge: translates protobuf to job-store and worker calls."""

from __future__ import annotations

import asyncio
import logging

import grpc
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from loraforge_core.devices import validate_device
from loraforge_core.models import resolve_model
from loraforge_core.settings import ServerSettings

log = logging.getLogger("loraforge.trainer")


class TrainerService:
    """Owns the trainer's resources; the servicer below is its gRPC face."""

    service_names = (trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name,)

    def __init__(self, settings: ServerSettings) -> None:
        validate_device(settings.device)
        self.settings = settings
        self.base_model = ""

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(self), server)

    async def start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.base_model = await asyncio.to_thread(resolve_model, self.settings.model)
        log.info("trainer ready", extra={"base_model": self.base_model})

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, service: TrainerService) -> None:
        self.service = service
