"""The Trainer gRPC servicer: each method reads its request, calls one TrainerService
method (service.py) and maps the answer (proto_mapping.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from trainer_service.proto_mapping import (
    artifact_to_proto,
    chunk_size,
    config_from_request,
    event_to_proto,
    images_from_request,
    job_to_proto,
    page_from_request,
    state_filter,
)
from trainer_service.service import TrainerService


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    service_names = (trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name,)

    def __init__(self, service: TrainerService) -> None:
        self.service = service

    def add_to(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServicer_to_server(self, server)

    async def CreateJob(self, request, context):
        job = await self.service.create_job(
            request.request_id, config_from_request(request), images_from_request(request)
        )
        return job_to_proto(job)

    async def GetJob(self, request, context):
        return job_to_proto(await self.service.job(request.job_id))

    async def ListJobs(self, request, context):
        size, offset = page_from_request(request)
        jobs, more = await self.service.list_jobs(state_filter(request), size, offset)
        return trainer_pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in jobs],
            next_page_token=str(offset + size) if more else "",
        )

    async def CancelJob(self, request, context):
        job = await self.service.job(request.job_id)
        return job_to_proto(await self.service.cancel_job(job.job_id))

    async def WatchJob(self, request, context) -> AsyncIterator[trainer_pb2.JobEvent]:
        async for event in self.service.events(request.job_id, request.after_sequence):
            yield event_to_proto(event)

    async def GetArtifact(self, request, context):
        return artifact_to_proto(*await self.service.artifact(request.artifact_id))

    async def DownloadArtifact(self, request, context):
        chunk = chunk_size(request)
        archive = await self.service.artifact_archive(request.artifact_id)
        for offset in range(0, len(archive), chunk):
            yield trainer_pb2.ArtifactChunk(
                data=archive[offset : offset + chunk], offset=offset, total_size=len(archive)
            )
