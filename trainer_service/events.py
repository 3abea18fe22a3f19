"""The training event protocol: one typed event per thing a job reports.

The engine emits these; the training process writes each as a JSON line on stdout; the
runner reads them back and the job store persists them under the same kind with the same
fields; the gRPC edge turns each into its ``JobEvent`` message. One codec serves the line and
the store (``to_payload`` / ``from_payload``), so no field is listed twice.

Names: an event's ``kind`` is its field's name in the proto ``JobEvent`` (the store and the
client's ``JobEvent.kind`` say the same; ``state_change`` is stored as ``state``, as since 0.1),
and where its class names what happened differently from the proto message, the message's
name is used (``CheckpointEvaluated``).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import IO, Any, ClassVar, Protocol


@dataclass(frozen=True)
class StateChange:
    kind: ClassVar[str] = "state"
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Progress:
    kind: ClassVar[str] = "progress"
    phase: str  # preparing | inversion | tuning | saving
    step: int  # within the phase
    total_steps: int  # of the phase
    loss: float
    lr: float
    steps_per_second: float
    eta_seconds: float
    global_step: int


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint was written; ``artifact_id`` is its bundle in the artifact store."""

    kind: ClassVar[str] = "checkpoint"
    artifact_id: str
    global_step: int
    write_seconds: float = 0.0  # resume state and bundle to disk (absent before 0.3)


@dataclass(frozen=True)
class CheckpointEvaluated:
    """A checkpoint was scored: ``evaluation`` is loraforge_core.evaluation's, as a dict."""

    kind: ClassVar[str] = "evaluation"
    artifact_id: str
    evaluation: dict[str, Any]
    best: bool = False  # the best of the job's checkpoints so far


@dataclass(frozen=True)
class FinalArtifact:
    kind: ClassVar[str] = "final_artifact"
    artifact_id: str
    global_step: int = 0  # absent in events stored before version 0.2


@dataclass(frozen=True)
class Preview:
    kind: ClassVar[str] = "preview"
    global_step: int
    prompt: str
    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Log:
    kind: ClassVar[str] = "log"
    level: str  # info | warning | error
    message: str


JobEvent = StateChange | Progress | Checkpoint | CheckpointEvaluated | FinalArtifact | Preview | Log
KINDS: dict[str, type] = {
    cls.kind: cls
    for cls in (StateChange, Progress, Checkpoint, CheckpointEvaluated, FinalArtifact, Preview, Log)
}
_BYTES = {"png"}  # bytes fields, base64 in JSON


def to_payload(event: JobEvent) -> dict[str, Any]:
    """The event's fields as a JSON-ready dict (bytes as base64)."""
    payload = asdict(event)
    for name in _BYTES & payload.keys():
        payload[name] = base64.b64encode(payload[name]).decode()
    return payload


def from_payload(kind: str, payload: dict[str, Any]) -> JobEvent:
    """The event of ``kind`` from its payload; unknown fields (a newer writer's) are ignored."""
    cls = KINDS[kind]
    values = {f.name: payload[f.name] for f in fields(cls) if f.name in payload}
    for name in _BYTES & values.keys():
        values[name] = base64.b64decode(values[name])
    return cls(**values)


def to_line(event: JobEvent) -> str:
    return json.dumps({"event": event.kind, **to_payload(event)})


def parse_line(line: str) -> JobEvent | None:
    """An event from a training process's output line; None for anything else (library
    noise that reached stdout)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
        return from_payload(data.pop("event"), data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Reporter(Protocol):
    def emit(self, event: JobEvent) -> None: ...


@dataclass
class JsonLinesReporter:
    """Writes one JSON line per event to a stream (the training process's stdout)."""

    stream: IO[str] = sys.stdout

    def emit(self, event: JobEvent) -> None:
        self.stream.write(to_line(event) + "\n")
        self.stream.flush()


class ListReporter:
    """Keeps events in memory (library use, tests, benchmarks)."""

    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    def emit(self, event: JobEvent) -> None:
        self.events.append(event)


class CallbackReporter:
    """Hands each event to a function (``training.trainer.train``'s ``on_event``)."""

    def __init__(self, on_event: Callable[[JobEvent], None]) -> None:
        self.emit = on_event


class NullReporter:
    def emit(self, event: JobEvent) -> None:
        pass
