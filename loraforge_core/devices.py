"""Device selection: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate_device(spec: str) -> str:
    """Return spec if it names a device kind we accept, else raise ValueError."""
    if not _DEVICE_PATTERN.match(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {spec!r}")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device for a spec; ``auto`` picks CUDA when available."""
    import torch

    validate_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec} requested but only {torch.cuda.device_count()} GPUs")
    return device


def visible_gpus(spec: str) -> list[int]:
    """The CUDA devices a server on device ``spec`` may hand out: all for ``cuda`` (and for
    ``auto`` where CUDA is available), one for ``cuda:N``, none on the CPU. ``cpu`` is answered
    without importing torch, which a trainer server needs for nothing else."""
    if validate_device(spec) == "cpu":
        return []
    import torch

    device = resolve_device(spec)
    if device.type != "cuda":
        return []
    if device.index is not None:
        return [device.index]
    return list(range(torch.cuda.device_count()))


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the device running out of memory: CUDA's ``OutOfMemoryError``, or
    the CPU allocator's failure (a RuntimeError that says it cannot allocate)."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back after an out-of-memory error."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
