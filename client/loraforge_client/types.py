"""Typed results: plain dataclasses built from the protobuf messages."""

from __future__ import annotations

import io
import re
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
class ScaleScore:
    scale: float
    subject_fidelity: float
    prompt_fidelity: float
    images: int


@dataclass
class Evaluation:
    """A checkpoint rendered at several adapter scales and scored (see the proto)."""

    global_step: int
    scores: list[ScaleScore]
    scorer: str
    scorer_model: str
    recommended_scale: float
    score: float
    seconds: float

    @classmethod
    def from_proto(cls, m: common_pb2.Evaluation) -> Evaluation:
        scores = [ScaleScore(s.scale, s.subject_fidelity, s.prompt_fidelity, s.images)
                  for s in m.scores]  # fmt: skip
        return cls(m.global_step, scores, m.scorer, m.scorer_model, m.recommended_scale,
                   m.score, m.seconds)  # fmt: skip

    def table(self) -> str:
        """The scores as a small table, the recommended scale marked."""
        lines = [f"evaluation at step {self.global_step} ({self.scorer}, {self.seconds:.1f} s)",
                 "  scale  subject  prompt  images"]  # fmt: skip
        for s in self.scores:
            mark = "  <- recommended" if abs(s.scale - self.recommended_scale) < 1e-6 else ""
            lines.append(f"  {s.scale:5.2f}  {s.subject_fidelity:7.3f}  "
                         f"{s.prompt_fidelity:6.3f}  {s.images:6d}{mark}")  # fmt: skip
        return "\n".join(lines)


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
    best_artifact_id: str = ""  # the checkpoint whose evaluation scored best

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
            job, job.best_artifact_id,
        )  # fmt: skip


@dataclass
class JobEvent:
    """One event of a job's log. ``kind`` names which of the optional fields is set."""

    job_id: str
    sequence: int
    kind: str  # state | progress | checkpoint | evaluation | preview | log | final_artifact
    state: str = ""
    reason: str = ""
    progress: Progress | None = None
    artifact_id: str = ""
    global_step: int = 0
    preview_png: bytes = b""
    level: str = ""
    message: str = ""
    evaluation: Evaluation | None = None  # with artifact_id; best: the job's best so far
    best: bool = False

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
        elif kind == "evaluation":
            event.artifact_id, event.best = e.evaluation.artifact_id, e.evaluation.best
            event.evaluation = Evaluation.from_proto(e.evaluation.evaluation)
            event.global_step = event.evaluation.global_step
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
    """An adapter in a request: W = W0 + scale * dW (text encoder: text_encoder_scale). With
    ``use_recommended_scale`` the scales multiply the adapter's recommended scale. ``source``
    names where the server fetches it from on first use (``hf://OWNER/REPO[@REV]/FILE``,
    ``https://...``, ``s3://BUCKET/KEY``, optionally ``#sha256=<hex>``); the server names it
    itself when ``adapter_id`` is empty."""

    adapter_id: str = ""
    scale: float = 1.0
    text_encoder_scale: float | None = None
    use_recommended_scale: bool = False
    source: str = ""

    def to_proto(self) -> generator_pb2.AdapterRef:
        ref = generator_pb2.AdapterRef(
            adapter_id=self.adapter_id,
            scale=self.scale,
            use_recommended_scale=self.use_recommended_scale,
            source=self.source,
        )
        if self.text_encoder_scale is not None:
            ref.text_encoder_scale = self.text_encoder_scale
        return ref

    @classmethod
    def coerce(cls, value: AdapterRef | tuple | str) -> AdapterRef:
        """``"id"``, ``"https://..."`` (a reference), ``("id", 0.8)``, ``("id", 0.8, 0.5)`` or
        an AdapterRef."""
        if isinstance(value, AdapterRef):
            return value
        if isinstance(value, str):
            value = (value,)
        name, *scales = value
        if is_reference(name):
            return cls("", *scales, source=name)
        return cls(name, *scales)

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """CLI form ``ID_OR_REFERENCE[:scale[:text_encoder_scale]]``; a scale written with
        ``x`` (``1x``, ``0.8x``) is a multiple of the adapter's recommended scale."""
        name, scales = text, []
        while len(scales) < 2 and _SCALE.match(name.rpartition(":")[2]) and ":" in name:
            name, _, scale = name.rpartition(":")
            scales.insert(0, scale)
        if not name or (":" in name and not is_reference(name)):
            raise ValueError(f"{text!r}: use ID_OR_REFERENCE[:SCALE[:TE_SCALE]]")
        relative = any(s.endswith("x") for s in scales)
        ref = cls.coerce((name, *(float(s.removesuffix("x")) for s in scales)))
        ref.use_recommended_scale = relative
        return ref


_SCALE = re.compile(r"^-?(\d+\.?\d*|\.\d+)x?$")


def is_reference(text: str) -> bool:
    """Whether ``text`` names an adapter where it lives (hf://, https://, s3://; the server
    explains any other scheme it does not read)."""
    return "://" in text and not text.startswith("file://")


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
    family: str = ""  # the model family it was made for: sd | sdxl | flux | zimage
    evaluation: Evaluation | None = None  # its training checkpoint's, where it was scored
    source: str = ""  # a reference, "upload" or "store:<path>"
    source_sha256: str = ""  # of the file as it came

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
            Evaluation.from_proto(a.evaluation) if a.HasField("evaluation") else None,
            a.source,
            a.source_sha256,
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
