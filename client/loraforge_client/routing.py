"""Adapter-affine routing over several generator replicas.

A request goes to a replica that already holds all its adapters when the replicas' resident
lists (ListAdapters, refreshed every few seconds) say one does; otherwise to the replica with
the highest rendezvous hash of (replica, adapter set). The same adapter set therefore lands on
the same replica every time, so each replica loads a share of the adapters instead of every
adapter, and the choice moves for only 1/N of the sets when a replica comes or goes. A
replica that answered UNAVAILABLE or RESOURCE_EXHAUSTED goes to the back for a while, so the
next one in the order serves. Requests without adapters are spread round robin.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import time
from collections.abc import Callable, Iterable, Sequence

RESIDENT_REFRESH_S = 5.0
DEMOTE_S = 10.0


def expand_targets(target: str | Sequence[str], affinity: bool | None) -> list[str]:
    """The replicas behind ``target``: a list as given; with ``affinity``, a ``dns:///host:port``
    name becomes every address it resolves to (the pods of a headless Service). Anything else
    is one target (gRPC itself balances over a DNS name's addresses)."""
    if not isinstance(target, str):
        return list(target)
    if affinity and target.startswith("dns:///"):
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        addresses = sorted({info[4][0] for info in found})
        return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]
    return [target]


def _score(target: str, key: str) -> int:
    digest = hashlib.blake2b(f"{target}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class AffinityRouter:
    """The order in which to try replicas for a request's adapters (see the module doc)."""

    def __init__(
        self, targets: Iterable[str], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.targets = list(targets)
        self.clock = clock
        self.resident: dict[str, frozenset[str]] = {}
        self.refreshed_at: float | None = None
        self._demoted: dict[str, float] = {}
        self._spread = itertools.count()

    def order(self, adapter_ids: Sequence[str]) -> list[str]:
        wanted = frozenset(adapter_ids)
        if wanted:
            key = "\0".join(sorted(wanted))
            ranked = sorted(self.targets, key=lambda t: _score(t, key), reverse=True)
            holders = [t for t in ranked if wanted <= self.resident.get(t, frozenset())]
            ranked = holders + [t for t in ranked if t not in holders]
        else:
            start = next(self._spread) % len(self.targets)
            ranked = self.targets[start:] + self.targets[:start]
        now = self.clock()
        healthy = [t for t in ranked if self._demoted.get(t, 0.0) <= now]
        return healthy + [t for t in ranked if t not in healthy]

    def needs_refresh(self) -> bool:
        return self.refreshed_at is None or self.clock() - self.refreshed_at > RESIDENT_REFRESH_S

    def update(self, resident: dict[str, Iterable[str]]) -> None:
        """The adapters each replica holds (replicas that did not answer keep no hint)."""
        self.resident = {t: frozenset(ids) for t, ids in resident.items()}
        self.refreshed_at = self.clock()

    def demote(self, target: str) -> None:
        """``target`` refused or could not be reached: try it last for a while."""
        self._demoted[target] = self.clock() + DEMOTE_S
