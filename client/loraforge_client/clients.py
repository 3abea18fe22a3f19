"""Synchronous clients: ``TrainerClient`` and ``GeneratorClient``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
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
from loraforge_client.types import (
    AdapterInfo,
    AdapterRef,
    GeneratedImage,
    Job,
    JobEvent,
    unpack_bundle,
)


class _Base(ClientBase):
    def __init__(self, target: str | Sequence[str], **kwargs: Any) -> None:
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
        for channel in self.channels:
            channel.close()

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


class GeneratorClient(_Base, GeneratorReplicas):
    """Client of the loraforge Generator service.

    ``target`` may name several replicas: a list of addresses, or (with ``affinity=True``) a
    ``dns:///host:port`` name whose addresses are the replicas. Requests then go where their
    adapters already are (routing.py; ``affinity=False``: round robin); a replica that is down
    or full is skipped.
    """

    def __init__(
        self, target: str | Sequence[str], *, affinity: bool | None = None, **kwargs: Any
    ) -> None:
        super().__init__(target, affinity=affinity, **kwargs)  # GeneratorReplicas

    def _routed(self, rpc: str, request: Any, adapter_ids: list[str], timeout: float) -> Any:
        """The call on the replica the router picks for ``adapter_ids``, else the next."""
        if self.router is None:
            return self._call(getattr(self.stub, rpc), request, timeout=timeout)
        if self.router.needs_refresh():
            self.router.update(self._resident())
        failure: LoraforgeError | None = None
        for target in self._order(adapter_ids):
            try:
                method = getattr(self.stubs[target], rpc)
                return self._call(method, request, timeout=timeout, retry=False)
            except (UnavailableError, ResourceExhaustedError) as err:
                self.router.demote(target)
                failure = err
        assert failure is not None
        raise failure

    def _resident(self) -> dict[str, list[str]]:
        resident = {}
        for target, stub in self.stubs.items():
            try:
                reply = stub.ListAdapters(
                    generator_pb2.ListAdaptersRequest(), timeout=2, metadata=self.metadata
                )
            except grpc.RpcError:
                continue  # no hint from a replica that does not answer
            resident[target] = [a.adapter_id for a in reply.adapters if a.resident]
        return resident

    def generate(self, prompt: str, **kwargs: Any) -> list[GeneratedImage]:
        """Images for a prompt; ``adapters=[("my-dog", 0.8)]`` or AdapterRef objects."""
        request = generate_request(prompt, **kwargs)
        ids = routing_keys(request)
        reply = self._routed("Generate", request, ids, timeout=600)
        return [GeneratedImage.from_proto(i) for i in reply.images]

    def generate_stream(
        self, prompt: str, **kwargs: Any
    ) -> Iterator[tuple[int, int] | GeneratedImage]:
        """Yields (step, total) per denoising step, then each image."""
        request = generate_request(prompt, **kwargs)
        stub = self._stream_stub(routing_keys(request))
        try:
            for message in stub.GenerateStream(request, timeout=600, metadata=self.metadata):
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
        """Load on the replica that requests for this adapter alone are routed to."""
        request = load_adapter_request(adapter_id, source, pin=pin, in_store=in_store)
        return AdapterInfo.from_proto(
            self._routed("LoadAdapter", request, [adapter_id or request.uri], 300)
        )

    def unload_adapter(self, adapter_id: str) -> None:
        """Unload from every replica that holds it."""
        request = generator_pb2.UnloadAdapterRequest(adapter_id=adapter_id)
        if self.router is None:
            self._call(self.stub.UnloadAdapter, request)
            return
        found = False
        for stub in self.stubs.values():
            try:
                self._call(stub.UnloadAdapter, request, retry=False)
                found = True
            except NotFoundError:
                continue
        if not found:
            raise NotFoundError(f"adapter {adapter_id!r} is on no replica")

    def list_adapters(self) -> list[AdapterInfo]:
        """The adapters of every replica (an adapter held by two is listed twice)."""
        adapters = []
        for stub in self.stubs.values():
            reply = self._call(stub.ListAdapters, generator_pb2.ListAdaptersRequest())
            adapters += [AdapterInfo.from_proto(a) for a in reply.adapters]
        return adapters


__all__ = ["AdapterRef", "GeneratorClient", "TrainerClient"]
