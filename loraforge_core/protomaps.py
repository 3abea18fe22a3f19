"""Enum maps between our lower-case names and the generated protobuf enums, from their names.

``JOB_STATE_QUEUED`` is "queued": the proto is the one home of each enum's members, and a
member added there is known here without another list to update.
"""

from __future__ import annotations

from typing import Any


def enum_names(enum: Any, prefix: str, unspecified: str | None = None) -> dict[int, str]:
    """{number: name} for a generated enum; ``*_UNSPECIFIED`` maps to ``unspecified`` (or is
    left out, so that the caller refuses it)."""
    names = {number: name.removeprefix(prefix).lower() for name, number in enum.items()}
    if unspecified is None:
        names.pop(0, None)
    else:
        names[0] = unspecified
    return names


def enum_numbers(enum: Any, prefix: str) -> dict[str, int]:
    """{name: number} for the specified members of a generated enum."""
    return {name: number for number, name in enum_names(enum, prefix).items()}
