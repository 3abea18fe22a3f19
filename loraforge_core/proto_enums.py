"""The services' names for the contract's enums, both ways, with what an unset field means.

The rule is the client's (``loraforge_client.enums``): a member's name without the enum's
prefix, lower case (``JOB_STATE_QUEUED`` is "queued"), read from the generated members, so a
member added to the proto needs no list updated. The services read it here rather than import
the client library; tests/test_contract.py checks both sides name every member alike.
"""

from __future__ import annotations

from typing import Any


def enum_numbers(enum: Any, prefix: str) -> dict[str, int]:
    """{lower-case name: number} for every member but ``*_UNSPECIFIED``."""
    return {name.removeprefix(prefix).lower(): number for name, number in enum.items() if number}


def enum_names(enum: Any, prefix: str, unspecified: str | None = None) -> dict[int, str]:
    """{number: name}; ``*_UNSPECIFIED`` maps to ``unspecified``, or is left out so that the
    caller refuses it."""
    names = {number: name for name, number in enum_numbers(enum, prefix).items()}
    if unspecified is not None:
        names[0] = unspecified
    return names
