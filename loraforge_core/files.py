"""Filesystem helpers: atomic writes, fsync, inter-process locks, safe paths."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held across processes for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


NAME_MAX = 255  # bytes per path component on Linux file systems; longer ones fail in stat()
PATH_MAX = 1024  # far below Linux's 4096, leaving room for the root


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` if it stays inside root (no '..', no absolute path, no symlink out)."""
    if not name or name.startswith(("/", "\\")) or "\x00" in name:
        raise ValueError(f"invalid relative path {name!r}")
    if len(name.encode()) > PATH_MAX or any(
        len(part.encode()) > NAME_MAX for part in name.split("/")
    ):
        raise ValueError(f"path too long: at most {PATH_MAX} bytes, {NAME_MAX} bytes per component")
    root = Path(root).resolve()
    candidate = (root / name).resolve()
    if candidate != root and root not in candidate.parents:
        raise ValueError(f"path {name!r} escapes {root}")
    return candidate
