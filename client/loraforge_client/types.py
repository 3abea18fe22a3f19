"""Typed results: plain dataclasses built from the protobuf messages."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from loraforge.v1 import common_pb2, generator_pb2, trainer_pb2

from loraforge_client.enums import IMAGE_FORMATS, JOB_STATES, PHASES, name_of

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class Progress:
    phase: str
    step: int
    total_steps: int
    loss: float
    lr: float
    steps_per_second: float
    eta_seconds: float
    global_step: int

    @classmethod
    def from_proto(cls, p: trainer_pb2.TrainingProgress) -> Progress:
        values = {f.name: getattr(p, f.name) for f in fields(cls)}
        return cls(**{**values, "phase": name_of(PHASES, p.phase)})


@dataclass
class Job:
    job_id: str
    request_id: str
    state: str
    base_model: str
    placeholder_tokens: list[str]
    failure_reason: str
    progress: Progress | None
    final_artifact_id: str
    checkpoint_artifact_ids: list[str]
    last_event_sequence: int
    proto: trainer_pb2.Job = field(repr=False)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_proto(cls, job: trainer_pb2.Job) -> Job:
        return cls(
            job.job_id, job.request_id, name_of(JOB_STATES, job.state), job.base_model,
            list(job.placeholder_tokens), job.failure_reason,
            Progress.from_proto(job.progress) if job.HasField("progress") else None,
            job.final_artifact_id, list(job.checkpoint_artifact_ids), job.last_event_sequence,
            job,
        )  # fmt: skip


@dataclass
class JobEvent:
    """One event of a job's log. ``kind`` names which of the optional fields is set."""

    job_id: str
    sequence: int
    kind: str  # state | progress | checkpoint | preview | log | final_artifact
    state: str = ""
    reason: str = ""
    progress: Progress | None = None
    artifact_id: str = ""
    global_step: int = 0
    preview_png: bytes = b""
    level: str = ""
    message: str = ""

    @classmethod
    def from_proto(cls, e: trainer_pb2.JobEvent) -> JobEvent:
        kind = e.WhichOneof("kind") or "log"
        event = cls(e.job_id, e.sequence, "state" if kind == "state_change" else kind)
        if kind == "state_change":
            event.state = name_of(JOB_STATES, e.state_change.state)
            event.reason = e.state_change.reason
        elif kind == "progress":
            event.progress = Progress.from_proto(e.progress)
        elif kind == "checkpoint":
            event.artifact_id, event.global_step = (
                e.checkpoint.artifact_id,
                e.checkpoint.global_step,
            )
        elif kind == "final_artifact":
            event.artifact_id = e.final_artifact.artifact_id
        elif kind == "preview":
            event.preview_png, event.global_step = e.preview.image.data, e.preview.global_step
        else:
            event.level, event.message = e.log.level, e.log.message
        return event


@dataclass
class GeneratedImage:
    data: bytes
    seed: int
    width: int
    height: int
    format: str

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data)
        return path

    def to_pil(self):  # pragma: no cover - PIL is optional
        from PIL import Image

        return Image.open(io.BytesIO(self.data))

    @classmethod
    def from_proto(cls, image: common_pb2.Image) -> GeneratedImage:
        return cls(
            image.data,
            image.seed,
            image.width,
            image.height,
            name_of(IMAGE_FORMATS, image.format, unknown="png"),
        )


@dataclass
class AdapterRef:
    """An adapter in a request: W = W0 + scale * dW (text encoder: text_encoder_scale)."""

    adapter_id: str
    scale: float = 1.0
    text_encoder_scale: float | None = None

    def to_proto(self) -> generator_pb2.AdapterRef:
        ref = generator_pb2.AdapterRef(adapter_id=self.adapter_id, scale=self.scale)
        if self.text_encoder_scale is not None:
            ref.text_encoder_scale = self.text_encoder_scale
        return ref

    @classmethod
    def coerce(cls, value: AdapterRef | tuple | str) -> AdapterRef:
        """``"id"``, ``("id", 0.8)``, ``("id", 0.8, 0.5)`` or an AdapterRef."""
        if isinstance(value, AdapterRef):
            return value
        if isinstance(value, str):
            return cls(value)
        return cls(*value)

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """CLI form ``id[:scale[:text_encoder_scale]]``."""
        adapter_id, *scales = text.split(":")
        if not adapter_id or len(scales) > 2:
            raise ValueError(f"{text!r}: use ID[:SCALE[:TE_SCALE]]")
        return cls(adapter_id, *(float(s) for s in scales))


@dataclass
class AdapterInfo:
    adapter_id: str
    rank: int
    tokens: list[str]
    size_bytes: int
    sha256: str
    resident: bool
    pinned: bool
    source_format: str
    family: str = ""  # the model family it was made for: sd | sdxl

    @classmethod
    def from_proto(cls, a: generator_pb2.AdapterInfo) -> AdapterInfo:
        return cls(
            a.adapter_id,
            a.rank,
            list(a.tokens),
            a.size_bytes,
            a.sha256,
            a.resident,
            a.pinned,
            a.source_format,
            a.family,
        )


BUNDLE_FILES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "manifest.json")


def pack_bundle(folder: Path) -> bytes:
    """A bundle folder as the tar archive the services exchange."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in BUNDLE_FILES:
            archive.add(Path(folder) / name, arcname=name)
    return buffer.getvalue()


def unpack_bundle(data: bytes, dest: Path) -> Path:
    """Extract a downloaded bundle archive (only plain files, no paths) into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            if not member.isfile() or Path(member.name).name != member.name:
                raise ValueError(f"unexpected entry {member.name!r} in bundle archive")
            source = archive.extractfile(member)
            assert source is not None
            (dest / member.name).write_bytes(source.read())
    return dest
