"""The services' enum maps: the client's names for the proto enums (loraforge_client.enums,
read from the generated member names), both ways, with what an unset field means here.

The services already depend on the client distribution for the generated stubs; reading
names the same way on both sides keeps one rule for what ``JOB_STATE_QUEUED`` is called.
"""

from __future__ import annotations

from typing import Any

from loraforge_client.enums import by_name as enum_numbers


def enum_names(enum: Any, prefix: str, unspecified: str | None = None) -> dict[int, str]:
    """{number: name}; ``*_UNSPECIFIED`` maps to ``unspecified``, or is left out so that the
    caller refuses it."""
    names = {number: name for name, number in enum_numbers(enum, prefix).items()}
    if unspecified is not None:
        names[0] = unspecified
    return names


__all__ = ["enum_names", "enum_numbers"]
