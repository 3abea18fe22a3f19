"""Which waiting Generate requests are denoised together, and in what order.

No gRPC and no model here: the service (server.py) runs each call's turn on the one pipeline
thread, and this module decides what a turn serves. The ordering rules:

1. Every call, a Generate request or an adapter operation (load, unload), takes a ticket in
   arrival order, and the pipeline thread runs the turns in ticket order.
2. On a Generate request's turn, the oldest waiting request is served together with the
   requests behind it that may share its batch (``plan``: same size, steps, guidance and
   scheduler; at most ``max_images`` images and ``max_adapters`` distinct adapters in all).
   A request taken by an earlier turn finds nothing left to do on its own turn.
3. An adapter operation is a barrier: no request behind it joins a batch before it has run,
   and a turn whose oldest waiting request is younger than the turn serves nothing (that
   request waits behind an operation that has not run yet).
4. A request whose caller went away while it waited is dropped with ``Cancelled``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from inference_service.requests import GenerationJob, GenerationSpec, batch_key
from loraforge_core.errors import Cancelled


def plan(
    specs: Sequence[GenerationSpec], *, max_images: float = math.inf,
    max_adapters: float = math.inf,
) -> list[list[int]]:  # fmt: skip
    """Split requests into batches that may be denoised together (indexes, in order).

    Each request joins the first batch it fits: the same batch key, and the batch stays within
    ``max_images`` images and ``max_adapters`` distinct adapters. A request that alone exceeds
    a limit still gets a batch of its own.
    """
    batches: list[tuple[tuple, list[int]]] = []
    images: list[int] = []
    adapters: list[set[str]] = []
    for index, spec in enumerate(specs):
        key, names = batch_key(spec), {a.adapter_id for a in spec.adapters}
        for b, (batch_key_, members) in enumerate(batches):
            if (
                batch_key_ == key
                and images[b] + spec.num_images <= max_images
                and len(adapters[b] | names) <= max_adapters
            ):
                members.append(index)
                images[b] += spec.num_images
                adapters[b] |= names
                break
        else:
            batches.append((key, [index]))
            images.append(spec.num_images)
            adapters.append(names)
    return [members for _, members in batches]


@dataclass(eq=False)  # compared by identity
class PendingGeneration:
    """A Generate request waiting for the pipeline thread (ticket: its place in arrival order)."""

    job: GenerationJob
    ticket: int
    result: Future = field(default_factory=Future)


class BatchQueue:
    """The waiting Generate requests and the tickets of queued adapter operations."""

    def __init__(self, *, max_images: int = 8, max_adapters: int = 8) -> None:
        if max_images < 1:
            raise ValueError("max_batch_images must be at least 1 (1: no batching)")
        self.max_images = max_images
        self.max_adapters = max_adapters
        self.pending: list[PendingGeneration] = []
        self.barriers: set[int] = set()
        self._tickets = 0
        self._lock = threading.Lock()

    def _next_ticket(self) -> int:
        self._tickets += 1
        return self._tickets

    def add(self, job: GenerationJob) -> PendingGeneration:
        with self._lock:
            item = PendingGeneration(job, self._next_ticket())
            self.pending.append(item)
            return item

    def discard(self, item: PendingGeneration) -> None:
        """Forget a request that was not served (refused on drain, or its caller left)."""
        with self._lock:
            if item in self.pending:
                self.pending.remove(item)

    def add_barrier(self) -> int:
        """A ticket for an adapter operation; requests behind it wait until it is lifted."""
        with self._lock:
            ticket = self._next_ticket()
            self.barriers.add(ticket)
            return ticket

    def lift_barrier(self, ticket: int) -> None:
        with self._lock:
            self.barriers.discard(ticket)

    def take(self, turn: int) -> list[PendingGeneration]:
        """The batch that the turn of ticket ``turn`` serves (rules 2-4); empty for none."""
        with self._lock:
            for item in [i for i in self.pending if i.job.is_cancelled()]:
                self.pending.remove(item)
                item.result.set_exception(Cancelled("the caller cancelled the request"))
            if not self.pending or self.pending[0].ticket > turn:
                return []
            barrier = min(self.barriers, default=math.inf)
            eligible = [i for i in self.pending if i.ticket < barrier] or self.pending[:1]
            first = plan(
                [i.job.spec for i in eligible],
                max_images=self.max_images,
                max_adapters=self.max_adapters,
            )[0]
            batch = [eligible[i] for i in first]
            for item in batch:
                self.pending.remove(item)
            return batch
