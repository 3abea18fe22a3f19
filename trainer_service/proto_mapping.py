"""The Trainer contract's messages mapped to and from the domain: requests to a
``TrainingConfig``, jobs, events and artifacts to protobuf. The servicer (server.py) calls these
and nothing else touches protobuf on the trainer's side."""

from __future__ import annotations

from dataclasses import asdict

from google.protobuf import timestamp_pb2
from loraforge.v1 import common_pb2, trainer_pb2

from loraforge_core.bundle import Bundle
from loraforge_core.errors import InvalidArgument
from loraforge_core.evaluation import Evaluation
from loraforge_core.evaluation import to_proto as evaluation_to_proto
from loraforge_core.proto_enums import enum_names, enum_numbers
from trainer_service import events
from trainer_service.config import TrainingConfig
from trainer_service.events import Progress
from trainer_service.job_store import ArtifactRecord, EventRecord, JobRecord
from trainer_service.jobdir import ImageUpload

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
# Below the minimum a small bundle becomes hundreds of thousands of messages.
CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1024 * 1024, 4096, 4 * 1024 * 1024

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
    "weighting_scheme",
)  # fmt: skip
_LIST_OPTIONS = (
    "lora_unet_target_modules", "lora_clip_target_modules", "evaluation_scales",
    "evaluation_prompts",
)  # fmt: skip


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
        "logit_mean",
        "logit_std",
        "mode_scale",
        "guidance_scale",
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
        case events.CheckpointEvaluated(artifact_id=artifact_id, evaluation=evaluation, best=best):
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


def images_from_request(request: trainer_pb2.CreateJobRequest) -> list[ImageUpload]:
    return [ImageUpload(i.data, i.filename, i.caption, i.mask) for i in request.instance_images]


def artifact_to_proto(record: ArtifactRecord, bundle: Bundle) -> trainer_pb2.Artifact:
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


def state_filter(request: trainer_pb2.ListJobsRequest) -> str | None:
    """The job state a ListJobs request asks for (None: every state)."""
    if not request.state:
        return None
    if request.state not in PROTO_TO_STATE:
        raise InvalidArgument(f"unknown state {request.state}", "state")
    return PROTO_TO_STATE[request.state]


def page_from_request(request: trainer_pb2.ListJobsRequest) -> tuple[int, int]:
    """(page size, offset) of a ListJobs request; the page token is the offset."""
    size = request.page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"at most {MAX_PAGE_SIZE}", "page_size")
    try:
        offset = int(request.page_token or "0")
        if not 0 <= offset < 10**9:
            raise ValueError
    except ValueError:
        raise InvalidArgument("not a token from a previous page", "page_token") from None
    return size, offset


def chunk_size(request: trainer_pb2.DownloadArtifactRequest) -> int:
    chunk = request.chunk_size or CHUNK_SIZE
    if not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE:
        raise InvalidArgument(
            f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes (0: {CHUNK_SIZE})", "chunk_size"
        )
    return chunk
