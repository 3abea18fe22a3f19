"""How the engine reports: typed events written as JSON lines by the training process.

The trainer server reads these lines from the child's stdout and persists them as JobEvents.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol


class Reporter(Protocol):
    def emit(self, kind: str, **fields: Any) -> None: ...


@dataclass
class JsonLinesReporter:
    """Writes one JSON object per event to a stream (the child's stdout)."""

    stream: IO[str] = sys.stdout

    def emit(self, kind: str, **fields: Any) -> None:
        if "png" in fields:
            fields["png"] = base64.b64encode(fields["png"]).decode()
        self.stream.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
        self.stream.flush()


class ListReporter:
    """Keeps events in memory (library use, tests)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append({"event": kind, **fields})


class NullReporter:
    def emit(self, kind: str, **fields: Any) -> None:
        pass


def parse_event_line(line: str) -> dict[str, Any] | None:
    """An event from a child's output line; None for anything else (library noise)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    if "png" in event:
        event["png"] = base64.b64decode(event["png"])
    return event
