"""The trainer service's domain side, which the gRPC servicer (server.py) calls: jobs queued
with the server's defaults, watched and cancelled wherever in the fleet they run; artifacts
read from the artifact store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from loraforge_core import bundle as bundles
from loraforge_core import families
from loraforge_core.artifacts import fetch_bundle
from loraforge_core.bundle import Bundle
from loraforge_core.devices import validate_device, visible_gpus
from loraforge_core.errors import NotFound, ResourceExhausted, Unavailable
from loraforge_core.models import resolve_model
from loraforge_core.objectstore import ObjectStore, open_object_store
from loraforge_core.settings import FleetSettings, ServerSettings
from trainer_service import jobs, metrics
from trainer_service.config import TrainingConfig
from trainer_service.database import POOL_WAIT_S, open_database, redact, unreachable
from trainer_service.job_store import (
    RUNNING,
    TERMINAL,
    ArtifactRecord,
    EventRecord,
    JobRecord,
    JobStore,
)
from trainer_service.jobdir import ImageUpload
from trainer_service.worker import CANCEL_GRACE_S, JobRunner

log = logging.getLogger("loraforge.trainer")

MAX_WATCHERS = 256  # WatchJob streams open at once
DB_TIMEOUT_S = 10.0  # a job-database call slower than this answers UNAVAILABLE
# The thread a call runs on goes on after its deadline (threads cannot be cancelled): it must
# give up waiting for a connection first, or calls made during an outage hold every thread of
# the loop's executor and the first calls after it queue behind them.
assert POOL_WAIT_S < DB_TIMEOUT_S


class TrainerService:
    """The trainer's domain side: jobs created, watched and cancelled, artifacts read. It owns
    the job store and the runner; ``server.TrainerServicer`` is its gRPC face."""

    def __init__(
        self,
        settings: ServerSettings,
        num_processes: int = 1,
        max_jobs: int | None = None,
        keep_checkpoints: int = 0,
        fleet: FleetSettings | None = None,
    ) -> None:
        validate_device(settings.device)
        self.settings = settings
        self.num_processes = num_processes
        self.keep_checkpoints = keep_checkpoints  # 0: every checkpoint stays
        self.max_jobs = max_jobs  # None: one job per num_processes GPUs (one on a CPU machine)
        self.fleet = fleet or FleetSettings()
        self.base_model = ""
        self.data_dir = Path(settings.data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.artifacts_dir = self.data_dir / "artifacts"
        self.job_store: JobStore | None = None
        self.runner: JobRunner | None = None
        self._changed = asyncio.Condition()
        self.watchers = 0
        self.objects: ObjectStore | None = None
        self.collector: metrics.TrainerCollector | None = None

    async def start(self) -> None:
        for folder in (self.jobs_dir, self.artifacts_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.base_model = await asyncio.to_thread(resolve_model, self.settings.model)
        await asyncio.to_thread(
            families.require_served, self.base_model, "trainer", local_only=True
        )
        self.gpus = visible_gpus(self.settings.device)
        self.objects = await asyncio.to_thread(
            open_object_store, self.settings.artifact_store, self.data_dir
        )
        db = await asyncio.to_thread(
            open_database, self.fleet.database_url, self.data_dir,
            name=f"loraforge-trainer-{self.replica_id}", lease_s=self.fleet.lease_seconds,
        )  # fmt: skip
        self.job_store = JobStore(db)
        loop = asyncio.get_running_loop()
        db.listen(lambda job_id: loop.call_soon_threadsafe(self._changed_elsewhere, job_id))
        max_jobs = self.max_jobs
        if max_jobs is None:
            max_jobs = max(1, len(self.gpus) // self.num_processes)
        self.runner = JobRunner(
            self.job_store, self.jobs_dir, self.artifacts_dir, self.objects, max_jobs=max_jobs,
            gpus=self.gpus, num_processes=self.num_processes, replica_id=self.replica_id,
            lease_s=self.fleet.lease_seconds, keep_checkpoints=self.keep_checkpoints,
            on_event=self._notify,
        )  # fmt: skip
        self.runner.start()
        self.collector = metrics.TrainerCollector(
            counts=self.job_store.count_by_state, running=self.runner.running_progress
        )
        REGISTRY.register(self.collector)
        log.info("trainer ready", extra={
            "base_model": self.base_model, "max_jobs": max_jobs, "replica": self.replica_id,
            "database": redact(db.url),
        })  # fmt: skip

    @property
    def replica_id(self) -> str:
        """This replica's name in job leases: alone on SQLite it is "local"; in a fleet, the
        host and port (a restarted pod keeps them and takes its jobs back at once)."""
        if self.fleet.replica_id:
            return self.fleet.replica_id
        if not self.fleet.database_url:
            return "local"
        return f"{socket.gethostname()}:{self.settings.port}"

    def _changed_elsewhere(self, job_id: str) -> None:
        """Another replica (or this one, echoed by the database) changed a job."""
        if self.runner is not None:
            self.runner.wake()  # a queued job, or a freed lease, may be ours to run
        self._notify(job_id)

    async def create_job(
        self, request_id: str, config: TrainingConfig, images: list[ImageUpload]
    ) -> JobRecord:
        """Queue a job (idempotent on ``request_id``); the server's defaults fill what the
        request left unset: the base model, the device and a seed, recorded with the job."""
        store = self.ready_job_store()
        config = dataclasses.replace(
            config,
            pretrained_model_name_or_path=config.pretrained_model_name_or_path
            or self.settings.model,
            device="auto" if self.gpus else "cpu",
            seed=config.seed if config.seed is not None else random.randrange(2**31),
        )
        spec = jobs.JobSpec(request_id=request_id, config=config, images=images)
        job, created = await asyncio.to_thread(
            jobs.create_job, store, self.jobs_dir, spec, self.objects
        )
        if created:
            log.info("job created", extra={"job_id": job.job_id, "images": job.num_images})
            assert self.runner is not None
            self.runner.wake()
            self._notify(job.job_id)
        return job

    async def cancel_job(self, job_id: str) -> JobRecord:
        """Cancel wherever the job runs; answer with its state once it stopped (or, if the
        replica running it does not stop it within a lease and a grace period, still RUNNING
        with the cancel asked)."""
        assert self.runner is not None
        await self.runner.cancel(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fleet.lease_seconds + CANCEL_GRACE_S
        job = await self.job(job_id)
        while job.state == RUNNING and loop.time() < deadline:
            await self.wait_for_change(1.0)
            job = await self.job(job_id)
        return job

    def _notify(self, job_id: str) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def wait_for_change(self, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def drain(self) -> None:
        if self.runner is not None:
            await self.runner.stop()

    async def close(self) -> None:
        if self.collector is not None:
            REGISTRY.unregister(self.collector)
        if self.job_store is not None:
            self.job_store.close()

    def ready_job_store(self) -> JobStore:
        if self.job_store is None or self.runner is None:
            raise Unavailable("the trainer is still starting (health: NOT_SERVING); retry shortly")
        return self.job_store

    async def _query(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A job-store call, off the event loop (every RPC and health go on while the database
        is slow or restarting) and bounded: UNAVAILABLE, never a hang, while it does not
        answer."""
        call = getattr(self.ready_job_store(), method)
        try:
            return await asyncio.wait_for(asyncio.to_thread(call, *args, **kwargs), DB_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"the job database did not answer within {DB_TIMEOUT_S:.0f} s; retry shortly"
            ) from None
        except Exception as err:
            if not unreachable(err):
                raise
            raise Unavailable(f"the job database did not answer ({err}); retry shortly") from err

    async def job(self, job_id: str) -> JobRecord:
        job = await self._query("get_job", job_id) if job_id else None
        if job is None:
            raise NotFound("job", job_id, "list jobs with ListJobs")
        return job

    async def list_jobs(
        self, state: str | None, size: int, offset: int
    ) -> tuple[list[JobRecord], bool]:
        """A page of jobs, newest first, and whether more follow."""
        found = await self._query("list_jobs", state=state, limit=size + 1, offset=offset)
        return found[:size], len(found) > size

    async def events(self, job_id: str, after: int) -> AsyncIterator[EventRecord]:
        """The job's events after sequence ``after``, then each as it happens, until the job
        ended and its last event was given (at most MAX_WATCHERS such streams at once)."""
        job = await self.job(job_id)
        if self.watchers >= MAX_WATCHERS:
            raise ResourceExhausted(f"{MAX_WATCHERS} streams are open; retry later", 5.0)
        self.watchers += 1
        try:
            async for event in self._events_after(job, after):
                yield event
        finally:
            self.watchers -= 1

    async def _events_after(self, job: JobRecord, after: int) -> AsyncIterator[EventRecord]:
        while True:
            found = await self._query("events_after", job.job_id, after)
            for event in found:
                yield event
                after = event.sequence
            if found:
                continue
            current = await self.job(job.job_id)
            if current.state in TERMINAL and after >= current.last_sequence:
                return
            await self.wait_for_change(1.0)

    async def artifact(self, artifact_id: str) -> tuple[ArtifactRecord, Bundle]:
        """An artifact's record and its bundle (fetched from the artifact store when another
        replica wrote it)."""
        record = await self._query("get_artifact", artifact_id) if artifact_id else None
        if record is None:
            raise NotFound("artifact", artifact_id)
        path = self.artifacts_dir / record.path
        if await asyncio.to_thread(fetch_bundle, self.objects, record.path, path) is None:
            raise NotFound("artifact", artifact_id, "recorded, but missing from the artifact store")
        return record, await asyncio.to_thread(bundles.read_bundle, path, verify=False)

    async def artifact_archive(self, artifact_id: str) -> bytes:
        """The artifact's bundle packed in one archive (bundle.pack)."""
        _, bundle = await self.artifact(artifact_id)
        return await asyncio.to_thread(bundles.pack, bundle.path)
