"""Synchronous clients: ``TrainerClient`` and ``GeneratorClient``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from loraforge.v1 import generator_pb2, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from loraforge_client._common import (
    ClientBase,
    ImageFile,
    WatchCursor,
    create_job_request,
    finished_job,
    generate_request,
    images_from_folder,
    list_jobs_request,
    load_adapter_request,
)
from loraforge_client.errors import from_rpc_error
from loraforge_client.types import (
    AdapterInfo,
    AdapterRef,
    GeneratedImage,
    Job,
    JobEvent,
    unpack_bundle,
)


class _Base(ClientBase):
    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, transport=grpc, **kwargs)

    def _call(
        self, method: Any, request: Any, *, timeout: float | None = None, retry: bool = True
    ) -> Any:
        """A unary call with a deadline; transient failures retry with backoff."""
        retrying = self._retrying(retry)
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                time.sleep(retrying.delay_after(err))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainerClient(_Base):
    """Client of the loraforge Trainer service."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)

    def create_job(self, images: Iterable[ImageFile | bytes | str | Path], **kwargs: Any) -> Job:
        """Queue a job. Retries are safe: the request carries a request_id (idempotency)."""
        request = create_job_request(images, **kwargs)
        return Job.from_proto(self._call(self.stub.CreateJob, request, timeout=300))

    def create_job_from_folder(self, folder: str | Path, **kwargs: Any) -> Job:
        return self.create_job(images_from_folder(folder), **kwargs)

    def get_job(self, job_id: str) -> Job:
        return Job.from_proto(
            self._call(self.stub.GetJob, trainer_pb2.GetJobRequest(job_id=job_id))
        )

    def list_jobs(self, *, state: str | None = None, page_size: int = 50) -> Iterator[Job]:
        """Every job (optionally in one state), fetching pages as it goes."""
        token = ""
        while True:
            page = self._call(self.stub.ListJobs, list_jobs_request(state, page_size, token))
            for job in page.jobs:
                yield Job.from_proto(job)
            token = page.next_page_token
            if not token:
                return

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_proto(
            self._call(
                self.stub.CancelJob, trainer_pb2.CancelJobRequest(job_id=job_id), timeout=120
            )
        )

    def watch(
        self, job_id: str, *, after_sequence: int = 0, reconnect_for: float = 300.0
    ) -> Iterator[JobEvent]:
        """The job's events until it ends; reconnects on UNAVAILABLE without gaps or repeats."""
        cursor = WatchCursor(job_id, after_sequence, reconnect_for)
        while True:
            try:
                for message in self.stub.WatchJob(cursor.request(), metadata=self.metadata):
                    event = cursor.accept(message)
                    if event is not None:
                        yield event
                return
            except grpc.RpcError as err:
                time.sleep(cursor.delay_after(err))

    def wait(self, job_id: str) -> Job:
        """Block until the job ends; return it, or raise JobFailedError."""
        for _ in self.watch(job_id):
            pass
        return finished_job(self.get_job(job_id))

    def download_artifact(self, artifact_id: str, dest: str | Path) -> Path:
        """Download a bundle and extract it into the folder ``dest``."""
        chunks = []
        try:
            for chunk in self.stub.DownloadArtifact(
                trainer_pb2.DownloadArtifactRequest(artifact_id=artifact_id),
                timeout=max(self.timeout, 600), metadata=self.metadata,
            ):  # fmt: skip
                chunks.append(chunk.data)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return unpack_bundle(b"".join(chunks), Path(dest))


class GeneratorClient(_Base):
    """Client of the loraforge Generator service."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.stub = generator_pb2_grpc.GeneratorStub(self.channel)

    def generate(self, prompt: str, **kwargs: Any) -> list[GeneratedImage]:
        """Images for a prompt; ``adapters=[("my-dog", 0.8)]`` or AdapterRef objects."""
        reply = self._call(self.stub.Generate, generate_request(prompt, **kwargs), timeout=600)
        return [GeneratedImage.from_proto(i) for i in reply.images]

    def generate_stream(
        self, prompt: str, **kwargs: Any
    ) -> Iterator[tuple[int, int] | GeneratedImage]:
        """Yields (step, total) per denoising step, then each image."""
        try:
            for message in self.stub.GenerateStream(
                generate_request(prompt, **kwargs), timeout=600, metadata=self.metadata
            ):
                if message.WhichOneof("kind") == "progress":
                    yield message.progress.step, message.progress.total_steps
                else:
                    yield GeneratedImage.from_proto(message.image)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def load_adapter(
        self,
        adapter_id: str,
        source: str | Path | bytes,
        *,
        pin: bool = False,
        in_store: bool = False,
    ) -> AdapterInfo:
        request = load_adapter_request(adapter_id, source, pin=pin, in_store=in_store)
        return AdapterInfo.from_proto(self._call(self.stub.LoadAdapter, request, timeout=300))

    def unload_adapter(self, adapter_id: str) -> None:
        self._call(
            self.stub.UnloadAdapter, generator_pb2.UnloadAdapterRequest(adapter_id=adapter_id)
        )

    def list_adapters(self) -> list[AdapterInfo]:
        reply = self._call(self.stub.ListAdapters, generator_pb2.ListAdaptersRequest())
        return [AdapterInfo.from_proto(a) for a in reply.adapters]


__all__ = ["AdapterRef", "GeneratorClient", "TrainerClient"]
