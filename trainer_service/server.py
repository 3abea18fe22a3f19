"""The Trainer gRPC edge: protobuf in, job-store and runner calls, protobuf out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2
from loraforge.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from prometheus_client import REGISTRY

from loraforge_core import bundle as bundles
from loraforge_core import families
from loraforge_core.artifacts import fetch_bundle
from loraforge_core.devices import resolve_device, validate_device, visible_gpus
from loraforge_core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from loraforge_core.evaluation import Evaluation
from loraforge_core.evaluation import to_proto as evaluation_to_proto
from loraforge_core.models import resolve_model
from loraforge_core.objectstore import ObjectStore, open_object_store
from loraforge_core.protomaps import enum_names, enum_numbers
from loraforge_core.settings import ServerSettings
from trainer_service import events, jobs, metrics
from trainer_service.config import TrainingConfig
from trainer_service.database import open_database, redact
from trainer_service.events import Progress
from trainer_service.jobdir import ImageUpload
from trainer_service.store import RUNNING, TERMINAL, EventRecord, JobRecord, JobStore
from trainer_service.worker import CANCEL_GRACE_S, LEASE_S, JobRunner

log = logging.getLogger("loraforge.trainer")

STATE_TO_PROTO = enum_numbers(trainer_pb2.JobState, "JOB_STATE_")
PROTO_TO_STATE = enum_names(trainer_pb2.JobState, "JOB_STATE_")
PHASE_TO_PROTO = enum_numbers(trainer_pb2.TrainingPhase, "TRAINING_PHASE_")
METHODS = enum_names(trainer_pb2.TrainingMethod, "TRAINING_METHOD_", "pti")
METHOD_TO_PROTO = enum_numbers(trainer_pb2.TrainingMethod, "TRAINING_METHOD_")
TEMPLATES = enum_names(trainer_pb2.CaptionTemplate, "CAPTION_TEMPLATE_", "object")
PRECISIONS = enum_names(trainer_pb2.MixedPrecision, "MIXED_PRECISION_", "no")
PRECISION_TO_PROTO = enum_numbers(trainer_pb2.MixedPrecision, "MIXED_PRECISION_")
LR_SCHEDULERS = enum_names(trainer_pb2.LrScheduler, "LR_SCHEDULER_", "linear")
LR_SCHEDULER_TO_PROTO = enum_numbers(trainer_pb2.LrScheduler, "LR_SCHEDULER_")
ARTIFACT_KIND_TO_PROTO = enum_numbers(trainer_pb2.ArtifactKind, "ARTIFACT_KIND_")
SCORERS = enum_names(trainer_pb2.EvaluationScorer, "EVALUATION_SCORER_", "auto")
SCORER_TO_PROTO = enum_numbers(trainer_pb2.EvaluationScorer, "EVALUATION_SCORER_")
FINAL_SELECTIONS = enum_names(trainer_pb2.FinalSelection, "FINAL_SELECTION_", "last")
FINAL_SELECTION_TO_PROTO = enum_numbers(trainer_pb2.FinalSelection, "FINAL_SELECTION_")
# TrainingConfig proto fields that map one to one onto the dataclass (optional scalars).
_SCALAR_OPTIONS = [
    f.name for f in trainer_pb2.TrainingConfig.DESCRIPTOR.fields
    if f.has_presence and f.type != f.TYPE_MESSAGE
]  # fmt: skip
_STRING_OPTIONS = (
    "instance_prompt", "class_prompt", "validation_prompt", "revision",
    "pretrained_vae_name_or_path", "placeholder_token_at_data", "evaluation_model",
)  # fmt: skip
_LIST_OPTIONS = (
    "lora_unet_target_modules", "lora_clip_target_modules", "evaluation_scales",
    "evaluation_prompts",
)  # fmt: skip
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
# Below the minimum a small bundle becomes hundreds of thousands of messages.
CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1024 * 1024, 4096, 4 * 1024 * 1024
MAX_WATCHERS = 256


def _enum(mapping: dict[int, str], value: int, field_name: str) -> str:
    if value not in mapping:
        raise InvalidArgument(f"unknown value {value}", field_name)
    return mapping[value]


def config_from_request(request: trainer_pb2.CreateJobRequest) -> TrainingConfig:
    """Map a CreateJobRequest onto the one TrainingConfig (unset fields keep their defaults)."""
    message = request.config
    values: dict[str, object] = {
        name: getattr(message, name) for name in _SCALAR_OPTIONS if message.HasField(name)
    }
    for name in _STRING_OPTIONS:
        if getattr(message, name):
            values[name] = getattr(message, name)
    for name in _LIST_OPTIONS:
        if getattr(message, name):
            values[name] = list(getattr(message, name))
    if "evaluation_scales" in values:  # float32 on the wire: keep the decimals written
        values["evaluation_scales"] = [float(f"{x:.7g}") for x in values["evaluation_scales"]]
    for name in ("lr_scheduler", "lr_scheduler_lora"):
        values[name] = _enum(LR_SCHEDULERS, getattr(message, name), f"config.{name}")
    values["evaluation_scorer"] = _enum(SCORERS, message.evaluation_scorer,
                                        "config.evaluation_scorer")  # fmt: skip
    values["select_final"] = _enum(FINAL_SELECTIONS, message.select_final, "config.select_final")
    values["mixed_precision"] = _enum(PRECISIONS, message.mixed_precision, "config.mixed_precision")
    values["method"] = _enum(METHODS, request.method, "method")
    values["use_template"] = _enum(TEMPLATES, request.template, "template")
    values["pretrained_model_name_or_path"] = request.base_model
    if request.placeholder_tokens:
        values["placeholder_tokens"] = list(request.placeholder_tokens)
    values["initializer_tokens"] = list(request.initializer_tokens)
    for name in (
        "learning_rate_unet",
        "learning_rate_text",
        "learning_rate_ti",
        "weight_decay_ti",
        "weight_decay_lora",
        "lora_dropout",
        "max_grad_norm",
        "prior_loss_weight",
        "continue_inversion_lr",
        "lora_alpha",
        "caption_dropout",
        "snr_gamma",
        "mask_temperature",
        "evaluation_guidance",
    ):
        if name in values:  # float32 on the wire: keep the decimal the caller wrote
            values[name] = float(f"{values[name]:.7g}")
    return TrainingConfig.from_dict(values)


def config_to_proto(config: dict) -> trainer_pb2.TrainingConfig:
    message = trainer_pb2.TrainingConfig()
    for name in _SCALAR_OPTIONS:
        if config.get(name) is not None:
            setattr(message, name, config[name])
    for name in _STRING_OPTIONS:
        setattr(message, name, config.get(name) or "")
    for name in _LIST_OPTIONS:
        getattr(message, name).extend(config.get(name, []))
    message.evaluation_scorer = SCORER_TO_PROTO.get(config.get("evaluation_scorer", "auto"), 0)
    message.select_final = FINAL_SELECTION_TO_PROTO[config.get("select_final", "last")]
    message.lr_scheduler = LR_SCHEDULER_TO_PROTO[config["lr_scheduler"]]
    message.lr_scheduler_lora = LR_SCHEDULER_TO_PROTO[config.get("lr_scheduler_lora", "linear")]
    message.mixed_precision = PRECISION_TO_PROTO[config["mixed_precision"]]
    return message


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def progress_to_proto(progress: Progress | None) -> trainer_pb2.TrainingProgress:
    if progress is None:
        return trainer_pb2.TrainingProgress()
    fields = {**asdict(progress), "phase": PHASE_TO_PROTO.get(progress.phase, 0)}
    return trainer_pb2.TrainingProgress(**fields)


def job_to_proto(job: JobRecord) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        job_id=job.job_id, request_id=job.request_id, state=STATE_TO_PROTO[job.state],
        method=METHOD_TO_PROTO[job.method], base_model=job.base_model,
        placeholder_tokens=job.tokens, created_at=_timestamp(job.created_at),
        started_at=_timestamp(job.started_at), finished_at=_timestamp(job.finished_at),
        failure_reason=job.failure_reason, progress=progress_to_proto(job.progress),
        final_artifact_id=job.final_artifact_id,
        checkpoint_artifact_ids=job.checkpoint_artifact_ids, num_instance_images=job.num_images,
        config=config_to_proto(job.config), last_event_sequence=job.last_sequence,
        best_artifact_id=job.best_artifact_id,
    )  # fmt: skip


def event_to_proto(record: EventRecord) -> trainer_pb2.JobEvent:
    message = trainer_pb2.JobEvent(
        job_id=record.job_id, sequence=record.sequence, time=_timestamp(record.time)
    )
    match record.event:
        case events.StateChange(state=state, reason=reason):
            message.state_change.state = STATE_TO_PROTO[state]
            message.state_change.reason = reason
        case events.Progress() as progress:
            message.progress.CopyFrom(progress_to_proto(progress))
        case events.Checkpoint(artifact_id=artifact_id, global_step=step):
            message.checkpoint.artifact_id = artifact_id
            message.checkpoint.global_step = step
        case events.FinalArtifact(artifact_id=artifact_id):
            message.final_artifact.artifact_id = artifact_id
        case events.Evaluated(artifact_id=artifact_id, evaluation=evaluation, best=best):
            message.evaluation.artifact_id, message.evaluation.best = artifact_id, best
            evaluation_to_proto(Evaluation.from_dict(evaluation), message.evaluation.evaluation)
        case events.Preview() as preview:
            message.preview.global_step = preview.global_step
            message.preview.prompt = preview.prompt
            message.preview.image.CopyFrom(common_pb2.Image(
                data=preview.png, format=common_pb2.IMAGE_FORMAT_PNG, width=preview.width,
                height=preview.height,
            ))  # fmt: skip
        case events.Log(level=level, message=text):
            message.log.level = level
            message.log.message = text
    return message


@dataclasses.dataclass
class FleetSettings:
    """How this replica shares jobs with others: the job database (empty: SQLite under the
    data dir, this replica alone), its name in leases, and the lease length."""

    database_url: str = ""
    replica_id: str = ""
    lease_seconds: float = LEASE_S


class TrainerService:
    """Owns the job store and the runner; the servicer below is its gRPC face."""

    service_names = (trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name,)

    def __init__(
        self,
        settings: ServerSettings,
        num_processes: int = 1,
        max_jobs: int | None = None,
        fleet: FleetSettings | None = None,
    ) -> None:
        validate_device(settings.device)
        self.settings = settings
        self.num_processes = num_processes
        self.max_jobs = max_jobs  # None: one job per num_processes GPUs (one on a CPU machine)
        self.fleet = fleet or FleetSettings()
        self.base_model = ""
        self.data_dir = Path(settings.data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.artifacts_dir = self.data_dir / "artifacts"
        self.store: JobStore | None = None
        self.runner: JobRunner | None = None
        self._changed = asyncio.Condition()
        self.watchers = 0
        self.objects: ObjectStore | None = None
        self.collector: metrics.TrainerCollector | None = None

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(self), server)

    async def start(self) -> None:
        for folder in (self.jobs_dir, self.artifacts_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.base_model = await asyncio.to_thread(resolve_model, self.settings.model)
        await asyncio.to_thread(
            families.require_served, self.base_model, "trainer", local_only=True
        )
        self.device = resolve_device(self.settings.device)
        self.objects = await asyncio.to_thread(
            open_object_store, self.settings.artifact_store, self.data_dir
        )
        db = await asyncio.to_thread(open_database, self.fleet.database_url, self.data_dir)
        self.store = JobStore(db)
        loop = asyncio.get_running_loop()
        db.listen(lambda job_id: loop.call_soon_threadsafe(self._changed_elsewhere, job_id))
        gpus = visible_gpus(self.device)
        max_jobs = self.max_jobs
        if max_jobs is None:
            max_jobs = max(1, len(gpus) // self.num_processes)
        self.runner = JobRunner(
            self.store, self.jobs_dir, self.artifacts_dir, self.objects, max_jobs=max_jobs,
            gpus=gpus, num_processes=self.num_processes, replica_id=self.replica_id,
            lease_s=self.fleet.lease_seconds, on_event=self._notify,
        )  # fmt: skip
        self.runner.start()
        self.collector = metrics.TrainerCollector(
            counts=self.store.count_by_state, running=self.runner.running_progress
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
        store = self.ready_store()
        config = dataclasses.replace(
            config,
            pretrained_model_name_or_path=config.pretrained_model_name_or_path
            or self.settings.model,
            device="cpu" if self.device.type == "cpu" else "auto",
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
        job = self.job(job_id)
        while job.state == RUNNING and loop.time() < deadline:
            await self.wait_for_change(1.0)
            job = self.job(job_id)
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
        if self.store is not None:
            self.store.close()

    def ready_store(self) -> JobStore:
        if self.store is None or self.runner is None:
            raise Unavailable("the trainer is still starting (health: NOT_SERVING); retry shortly")
        return self.store

    def job(self, job_id: str) -> JobRecord:
        job = self.ready_store().get_job(job_id) if job_id else None
        if job is None:
            raise NotFound("job", job_id, "list jobs with ListJobs")
        return job

    async def artifact_path(self, artifact_id: str) -> Path:
        """The artifact's local folder, fetched from the artifact store when another replica
        wrote it."""
        record = self.ready_store().get_artifact(artifact_id) if artifact_id else None
        if record is None:
            raise NotFound("artifact", artifact_id)
        path = self.artifacts_dir / record.path
        if await asyncio.to_thread(fetch_bundle, self.objects, record.path, path) is None:
            raise NotFound("artifact", artifact_id, "recorded, but missing from the artifact store")
        return path


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, service: TrainerService) -> None:
        self.service = service

    @property
    def store(self) -> JobStore:
        return self.service.ready_store()

    async def CreateJob(self, request, context):
        job = await self.service.create_job(
            request.request_id, config_from_request(request),
            [ImageUpload(i.data, i.filename, i.caption, i.mask) for i in request.instance_images],
        )  # fmt: skip
        return job_to_proto(job)

    async def GetJob(self, request, context):
        return job_to_proto(self.service.job(request.job_id))

    async def ListJobs(self, request, context):
        size = request.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"at most {MAX_PAGE_SIZE}", "page_size")
        try:
            offset = int(request.page_token or "0")
            if not 0 <= offset < 10**9:
                raise ValueError
        except ValueError:
            raise InvalidArgument("not a token from a previous page", "page_token") from None
        if request.state and request.state not in PROTO_TO_STATE:
            raise InvalidArgument(f"unknown state {request.state}", "state")
        state = PROTO_TO_STATE.get(request.state) if request.state else None
        found = self.store.list_jobs(state=state, limit=size + 1, offset=offset)
        return trainer_pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in found[:size]],
            next_page_token=str(offset + size) if len(found) > size else "",
        )

    async def CancelJob(self, request, context):
        job = self.service.job(request.job_id)
        return job_to_proto(await self.service.cancel_job(job.job_id))

    async def WatchJob(self, request, context) -> AsyncIterator[trainer_pb2.JobEvent]:
        job = self.service.job(request.job_id)
        if self.service.watchers >= MAX_WATCHERS:
            raise ResourceExhausted(f"{MAX_WATCHERS} streams are open; retry later", 5.0)
        self.service.watchers += 1
        try:
            async for event in self._events(job.job_id, request.after_sequence):
                yield event
        finally:
            self.service.watchers -= 1

    async def _events(self, job_id: str, after: int) -> AsyncIterator[trainer_pb2.JobEvent]:
        job = self.service.job(job_id)
        while True:
            events = self.store.events_after(job.job_id, after)
            for event in events:
                yield event_to_proto(event)
                after = event.sequence
            if events:
                continue
            current = self.service.job(job.job_id)
            if current.state in TERMINAL and after >= current.last_sequence:
                return
            await self.service.wait_for_change(1.0)

    async def GetArtifact(self, request, context):
        path = await self.service.artifact_path(request.artifact_id)
        record = self.store.get_artifact(request.artifact_id)
        assert record is not None
        bundle = await asyncio.to_thread(bundles.read_bundle, path, verify=False)
        manifest = bundle.manifest
        artifact = trainer_pb2.Artifact(
            artifact_id=record.artifact_id, job_id=record.job_id,
            kind=ARTIFACT_KIND_TO_PROTO[record.kind],
            global_step=record.global_step, base_model=manifest.base_model,
            tokens=manifest.tokens, rank=manifest.rank, size_bytes=bundle.size_bytes(),
            sha256=bundle.sha256(), created_at=_timestamp(record.created_at),
            files=[trainer_pb2.ArtifactFile(name=name, size_bytes=info["size"],
                                            sha256=info["sha256"])
                   for name, info in sorted(manifest.files.items())],
        )  # fmt: skip
        if manifest.evaluation:
            evaluation_to_proto(Evaluation.from_dict(manifest.evaluation), artifact.evaluation)
        return artifact

    async def DownloadArtifact(self, request, context):
        path = await self.service.artifact_path(request.artifact_id)
        chunk = request.chunk_size or CHUNK_SIZE
        if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE:
            raise InvalidArgument(
                f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes (0: {CHUNK_SIZE})", "chunk_size"
            )
        archive = await asyncio.to_thread(bundles.pack, path)
        for offset in range(0, len(archive), chunk):
            yield trainer_pb2.ArtifactChunk(
                data=archive[offset : offset + chunk], offset=offset, total_size=len(archive)
            )
