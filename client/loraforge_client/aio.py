"""asyncio twins of the clients, with the same method names: ``await client.get_job(...)``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from loraforge.v1 import generator_pb2, trainer_pb2, trainer_pb2_grpc

from loraforge_client._common import (
    ClientBase,
    GeneratorReplicas,
    ImageFile,
    WatchCursor,
    create_job_request,
    finished_job,
    generate_request,
    images_from_folder,
    list_jobs_request,
    load_adapter_request,
    routing_keys,
)
from loraforge_client.errors import (
    LoraforgeError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)
from loraforge_client.types import AdapterInfo, GeneratedImage, Job, JobEvent, unpack_bundle


class _AsyncBase(ClientBase):
    def __init__(self, target: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(target, transport=grpc.aio, **kwargs)

    async def _call(
        self, method: Any, request: Any, *, timeout: float | None = None, retry: bool = True
    ) -> Any:
        """A unary call with a deadline; transient failures retry with backoff."""
        retrying = self._retrying(retry)
        while True:
            try:
                return await method(
                    request, timeout=timeout or self.timeout, metadata=self.metadata
                )
            except grpc.aio.AioRpcError as err:
                await asyncio.sleep(retrying.delay_after(err))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncTrainerClient(_AsyncBase):
    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)

    async def create_job(
        self, images: Iterable[ImageFile | bytes | str | Path], **kwargs: Any
    ) -> Job:
        request = create_job_request(images, **kwargs)
        return Job.from_proto(await self._call(self.stub.CreateJob, request, timeout=300))

    async def create_job_from_folder(self, folder: str | Path, **kwargs: Any) -> Job:
        return await self.create_job(images_from_folder(folder), **kwargs)

    async def get_job(self, job_id: str) -> Job:
        return Job.from_proto(
            await self._call(self.stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id))
        )

    async def list_jobs(
        self, *, state: str | None = None, page_size: int = 50
    ) -> AsyncIterator[Job]:
        token = ""
        while True:
            page = await self._call(self.stub.ListJobs, list_jobs_request(state, page_size, token))
            for job in page.jobs:
                yield Job.from_proto(job)
            token = page.next_page_token
            if not token:
                return

    async def cancel_job(self, job_id: str) -> Job:
        return Job.from_proto(
            await self._call(
                self.stub.CancelJob, trainer_pb2.CancelJobRequest(job_id=job_id), timeout=120
            )
        )

    async def watch(
        self, job_id: str, *, after_sequence: int = 0, reconnect_for: float = 300.0
    ) -> AsyncIterator[JobEvent]:
        cursor = WatchCursor(job_id, after_sequence, reconnect_for)
        while True:
            try:
                async for message in self.stub.WatchJob(cursor.request(), metadata=self.metadata):
                    event = cursor.accept(message)
                    if event is not None:
                        yield event
                return
            except grpc.aio.AioRpcError as err:
                await asyncio.sleep(cursor.delay_after(err))

    async def wait(self, job_id: str) -> Job:
        async for _ in self.watch(job_id):
            pass
        return finished_job(await self.get_job(job_id))

    async def download_artifact(self, artifact_id: str, dest: str | Path) -> Path:
        chunks = []
        try:
            async for chunk in self.stub.DownloadArtifact(
                trainer_pb2.DownloadArtifactRequest(artifact_id=artifact_id),
                timeout=max(self.timeout, 600), metadata=self.metadata,
            ):  # fmt: skip
                chunks.append(chunk.data)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return unpack_bundle(b"".join(chunks), Path(dest))


class AsyncGeneratorClient(_AsyncBase, GeneratorReplicas):
    """asyncio twin of GeneratorClient, several replicas and adapter affinity included."""

    def __init__(
        self, target: str | Sequence[str], *, affinity: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(target, affinity=affinity, **kwargs)  # GeneratorReplicas

    async def _routed(self, rpc: str, request: Any, adapter_ids: list[str], timeout: float) -> Any:
        if self.router is None:
            return await self._call(getattr(self.stub, rpc), request, timeout=timeout)
        if self.router.needs_refresh():
            self.router.update(await self._resident())
        failure: LoraforgeError | None = None
        for target in self._order(adapter_ids):
            try:
                method = getattr(self.stubs[target], rpc)
                return await self._call(method, request, timeout=timeout, retry=False)
            except (UnavailableError, ResourceExhaustedError) as err:
                self.router.demote(target)
                failure = err
        assert failure is not None
        raise failure

    async def _resident(self) -> dict[str, list[str]]:
        resident = {}
        for target, stub in self.stubs.items():
            try:
                reply = await stub.ListAdapters(
                    generator_pb2.ListAdaptersRequest(), timeout=2, metadata=self.metadata
                )
            except grpc.aio.AioRpcError:
                continue
            resident[target] = [a.adapter_id for a in reply.adapters if a.resident]
        return resident

    async def generate(self, prompt: str, **kwargs: Any) -> list[GeneratedImage]:
        request = generate_request(prompt, **kwargs)
        ids = routing_keys(request)
        reply = await self._routed("Generate", request, ids, timeout=600)
        return [GeneratedImage.from_proto(i) for i in reply.images]

    async def generate_stream(
        self, prompt: str, **kwargs: Any
    ) -> AsyncIterator[tuple[int, int] | GeneratedImage]:
        request = generate_request(prompt, **kwargs)
        stub = self._stream_stub(routing_keys(request))
        try:
            async for message in stub.GenerateStream(request, timeout=600, metadata=self.metadata):
                if message.WhichOneof("kind") == "progress":
                    yield message.progress.step, message.progress.total_steps
                else:
                    yield GeneratedImage.from_proto(message.image)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def load_adapter(
        self,
        adapter_id: str,
        source: str | Path | bytes,
        *,
        pin: bool = False,
        in_store: bool = False,
    ) -> AdapterInfo:
        request = load_adapter_request(adapter_id, source, pin=pin, in_store=in_store)
        return AdapterInfo.from_proto(
            await self._routed("LoadAdapter", request, [adapter_id or request.uri], timeout=300)
        )

    async def unload_adapter(self, adapter_id: str) -> None:
        request = generator_pb2.UnloadAdapterRequest(adapter_id=adapter_id)
        if self.router is None:
            await self._call(self.stub.UnloadAdapter, request)
            return
        found = False
        for stub in self.stubs.values():
            try:
                await self._call(stub.UnloadAdapter, request, retry=False)
                found = True
            except NotFoundError:
                continue
        if not found:
            raise NotFoundError(f"adapter {adapter_id!r} is on no replica")

    async def list_adapters(self) -> list[AdapterInfo]:
        adapters = []
        for stub in self.stubs.values():
            reply = await self._call(stub.ListAdapters, generator_pb2.ListAdaptersRequest())
            adapters += [AdapterInfo.from_proto(a) for a in reply.adapters]
        return adapters
