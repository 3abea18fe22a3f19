"""Which waiting Generate requests are denoised together, and in what order.

No gRPC and no model here: ``PipelineTurns`` runs each call's turn on the one pipeline thread,
behind a bounded queue, and ``BatchQueue`` decides what a turn serves. The ordering rules:

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

import asyncio
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from inference_service import metrics
from inference_service.spec import (
    GeneratedImage,
    GenerationJob,
    GenerationSpec,
    Outcome,
    batch_key,
)
from loraforge_core.errors import Cancelled, ResourceExhausted, Unavailable

ServeBatch = Callable[[list[GenerationJob]], list[Outcome]]  # one outcome per job


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


class PipelineTurns:
    """The one pipeline thread and the bounded queue in front of it.

    Every call takes a ticket and runs on its turn, in arrival order (rule 1); a Generate
    request's turn serves the batch ``BatchQueue.take`` gives it. More than ``queue_size``
    calls waiting is RESOURCE_EXHAUSTED; once draining, calls not yet running are UNAVAILABLE.
    """

    def __init__(self, *, queue_size: int = 16, max_images: int = 8, max_adapters: int = 8):
        self.queue = BatchQueue(max_images=max_images, max_adapters=max_adapters)
        self.queue_size = queue_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self.waiting = 0  # calls admitted and not yet answered
        self.running = 0  # of which in the batch being denoised
        self.draining = False

    def _admit(self) -> None:
        if self.draining:
            metrics.REJECTED.labels("draining").inc()
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.waiting >= self.queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise ResourceExhausted(
                f"{self.waiting} requests are waiting (queue of {self.queue_size}); retry later",
                retry_after_seconds=1.0,
            )

    async def _on_pipeline_thread(self, fn: Callable[[], Any]) -> Any:
        def guarded():
            # Requests still queued when a drain starts are refused; the running one finishes.
            if self.draining:
                metrics.REJECTED.labels("draining").inc()
                raise Unavailable("the server is shutting down; retry on another replica")
            return fn()

        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, guarded)
        finally:
            self.waiting -= 1

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn on the pipeline thread on its turn: an adapter operation, a barrier to
        batching (rule 3)."""
        self._admit()
        ticket = self.queue.add_barrier()

        def call():
            self.queue.lift_barrier(ticket)
            return fn(*args, **kwargs)

        try:
            return await self._on_pipeline_thread(call)
        finally:
            self.queue.lift_barrier(ticket)

    async def generate(self, job: GenerationJob, serve: ServeBatch) -> list[GeneratedImage]:
        """Queue a Generate request; whichever turn takes it first serves it with ``serve``."""
        self._admit()
        item = self.queue.add(job)
        try:
            await self._on_pipeline_thread(lambda: self._serve_next_batch(item.ticket, serve))
        except Exception:
            if not item.result.done():  # a drain refuses this turn, yet an earlier batch
                raise  # may have served the request already: then its images are returned
        finally:
            self.queue.discard(item)  # refused on drain, or the caller went away
        # Served by now: each queued request's turn serves the oldest waiting one (if it is
        # not younger than the turn), so by this request's own turn it has been taken.
        return item.result.result(timeout=0)

    def _serve_next_batch(self, turn: int, serve: ServeBatch) -> None:
        batch = self.queue.take(turn)
        if not batch:
            return
        self.running = len(batch)
        try:
            outcomes = serve([item.job for item in batch])
        except Exception as err:
            outcomes = [err] * len(batch)
        finally:
            self.running = 0
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                item.result.set_exception(outcome)
            else:
                item.result.set_result(outcome)

    def drain(self) -> None:
        self.draining = True

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
