"""Bundles in the artifact store (objectstore.py): published after they are written, fetched
into a local folder before use, verified there, and kept in a size-bounded local cache.

A bundle's key is ``artifacts/<bundle id>/``; its manifest goes up last, so a bundle whose
manifest can be read is whole. A fetched bundle is verified (every file against the manifest's
sha256) in a staging folder and then renamed into place, so a half-fetched bundle is never
seen either.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from loraforge_core.bundle import BUNDLE_FILES, MANIFEST_FILE, Bundle, BundleError, read_bundle
from loraforge_core.objectstore import ObjectStore

ARTIFACTS = "artifacts/"
log = logging.getLogger("loraforge.artifacts")


def bundle_key(bundle_id: str) -> str:
    return f"{ARTIFACTS}{bundle_id}/"


def publish_bundle(objects: ObjectStore, folder: Path) -> None:
    """A bundle folder (named by its id) into the artifact store, manifest last."""
    objects.put_files(bundle_key(folder.name), folder, BUNDLE_FILES)


def fetch_bundle(objects: ObjectStore, bundle_id: str, dest: Path) -> Bundle | None:
    """The bundle at ``dest``, fetched from the artifact store if it is not there yet; None
    when it has no such bundle. Raises BundleError when what it holds does not verify."""
    if (dest / MANIFEST_FILE).is_file():
        return read_bundle(dest, verify=False)  # verified when it was fetched or written
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle_id}.", dir=dest.parent))
    try:
        # The manifest first: written last, it says the bundle is whole.
        for name in (MANIFEST_FILE, *(n for n in BUNDLE_FILES if n != MANIFEST_FILE)):
            if not objects.get_file(bundle_key(bundle_id) + name, staging / name):
                return None
        fetched = read_bundle(staging)  # every file against its sha256
        if fetched.id != bundle_id:  # whole and valid, but another bundle than asked for
            raise BundleError(
                f"the artifact store's {bundle_id} holds bundle {fetched.id}: not what its name "
                "says, refused"
            )
        try:
            staging.rename(dest)
        except OSError:  # another request fetched it first: keep that one
            if not (dest / MANIFEST_FILE).is_file():
                raise
        return read_bundle(dest, verify=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class BundleCache:
    """Bundles fetched from a remote store, under ``root``, at most ``limit_bytes`` in all.
    The least recently used go first, except those ``in_use`` names (loaded adapters).
    Threads asking for the same bundle at once share one download."""

    def __init__(
        self, objects: ObjectStore, root: Path, limit_bytes: int,
        in_use: Callable[[], set[Path]] = set,
    ) -> None:  # fmt: skip
        self.objects = objects
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self.in_use = in_use
        self.fetches = 0  # bundles fetched from the store (the rest came from the cache)
        self._lock = threading.Lock()
        self._downloads: dict[str, Future[Path | None]] = {}  # bundle id -> the one under way

    def get(self, bundle_id: str) -> Path | None:
        """The local folder of a bundle, fetched if needed; None when the store lacks it."""
        dest = self.root / bundle_id
        if (dest / MANIFEST_FILE).is_file():
            os.utime(dest)  # recency for the LRU order
            return dest
        with self._lock:
            download = self._downloads.get(bundle_id)
            leader = download is None
            if leader:
                download = self._downloads[bundle_id] = Future()
        if not leader:
            return download.result()  # the leader's folder, or its error
        try:
            download.set_result(self._download(bundle_id, dest))
        except BaseException as err:
            download.set_exception(err)
        finally:
            with self._lock:
                del self._downloads[bundle_id]
        fetched = download.result()
        if fetched is not None:  # after the waiters are released: in_use may take a lock that
            self.evict(keep=fetched)  # one of them holds while it waits (the registry's)
        return fetched

    def _download(self, bundle_id: str, dest: Path) -> Path | None:
        log.info("fetching bundle from the artifact store",
                 extra={"bundle_id": bundle_id, "store": self.objects.url})  # fmt: skip
        if fetch_bundle(self.objects, bundle_id, dest) is None:
            return None
        self.fetches += 1
        log.info("bundle fetched from the artifact store",
                 extra={"bundle_id": bundle_id, "store": self.objects.url})  # fmt: skip
        return dest

    def evict(self, keep: Path | None = None) -> list[str]:
        """Drop least recently used bundles until the cache fits; the ids dropped."""
        # Asked before the lock: in_use takes the adapter registry's, whose holder may be
        # waiting for this one.
        in_use = self.in_use()
        with self._lock:
            folders = [p for p in self.root.iterdir() if (p / MANIFEST_FILE).is_file()]
            sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in folders}
            total = sum(sizes.values())
            protected = {p.resolve() for p in in_use} | ({keep.resolve()} if keep else set())
            dropped = []
            for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
                if total <= self.limit_bytes:
                    break
                if folder.resolve() in protected:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]
                dropped.append(folder.name)
            return dropped
