"""The Generator gRPC servicer: each method reads its request, calls one GeneratorService
method (service.py) and maps the answer (proto_mapping.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
from loraforge.v1 import generator_pb2, generator_pb2_grpc

from inference_service.proto_mapping import (
    adapter_source,
    adapter_to_proto,
    images_to_proto,
    spec_from_request,
)
from inference_service.service import GeneratorService
from inference_service.spec import GenerationJob, validate_adapter_id


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    service_names = (generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name,)

    def __init__(self, service: GeneratorService) -> None:
        self.service = service

    def add_to(self, server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServicer_to_server(self, server)

    async def _generate(self, request, context, on_step=lambda step, total: None):
        spec = spec_from_request(request)
        cancelled = threading.Event()
        context.add_done_callback(lambda _: cancelled.set())
        images = await self.service.generate(GenerationJob(spec, on_step, cancelled.is_set))
        return images_to_proto(images)

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
        return adapter_to_proto(await self.service.load_adapter(**adapter_source(request)))

    async def UnloadAdapter(self, request, context):
        validate_adapter_id(request.adapter_id, "adapter_id")
        await self.service.unload_adapter(request.adapter_id)
        return generator_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        entries = await self.service.list_adapters()
        return generator_pb2.ListAdaptersResponse(adapters=[adapter_to_proto(e) for e in entries])
