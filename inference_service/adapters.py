"""Which adapters the server knows and which are resident in the model.

A known adapter (``AdapterEntry``, from adapter_store.py) is resident when its LoRA weights sit
in the peft layers (in a pre-shaped slot, slots.py, or under its own name) and its learned
tokens in the text encoder under private names (slots.TokenPool). At most ``max_resident``
are resident; the least recently used unpinned one is evicted to make room (never one that the
same batch needs) and reloads on demand. Methods that change residency run on the pipeline
thread; ``list`` may be called from any thread (the registry's lock guards the maps).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from inference_service import metrics
from inference_service.adapter_sources import AdapterEntry, AdapterSources
from inference_service.mixing import LoraMixer
from inference_service.references import is_reference, parse_reference
from inference_service.slots import SlotPool, TokenPool
from inference_service.spec import AdapterRequest
from loraforge_core import bundle as bundles
from loraforge_core import interop
from loraforge_core.devices import out_of_memory, release_cached_memory
from loraforge_core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from loraforge_core.lora_format import lora_pairs

log = logging.getLogger("loraforge.generator.adapters")

Keep = frozenset[str] | set[str]


def refuse_non_finite(adapter_id: str, tensors: dict[str, torch.Tensor]) -> None:
    """A NaN or infinite weight would turn every image the adapter touches black."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InvalidArgument(
                f"adapter {adapter_id!r}: tensor {name!r} holds NaN or infinite values",
                "adapter_id",
            )


class AdapterRegistry:
    def __init__(
        self, pipe: Any, sources: AdapterSources, mixer: LoraMixer, *, max_resident: int = 8,
        slot_rank: int = 16, extended_slots: bool = False,
    ) -> None:  # fmt: skip
        self.pipe = pipe
        self.mixer = mixer
        self.sources = sources
        self.max_resident = max_resident
        self.entries: dict[str, AdapterEntry] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.RLock()
        # Pre-shaped slots (rank slot_rank; default targets, or extended LoRA's): loading
        # becomes a weight copy.
        self.slots = (
            SlotPool(pipe, max_resident, slot_rank, extended=extended_slots)
            if slot_rank > 0
            else None
        )
        mixer.refresh()  # the mixer applies the slots' layers, not peft
        self.tokens = TokenPool(pipe)

    def register(
        self, adapter_id: str, *, data: bytes | None = None, uri: str = "", pin: bool = False,
        keep: Keep = frozenset(),
    ) -> AdapterEntry:  # fmt: skip
        """Make an adapter known and resident (from inline bytes, a reference or the artifact
        store)."""
        source = "bytes" if data is not None else uri.partition("://")[0] if (
            is_reference(uri)) else "store"  # fmt: skip
        with self.lock, metrics.ADAPTER_LOAD_SECONDS.labels(source).time():
            if adapter_id in self.entries:
                self._forget(adapter_id)
            entry = self.sources.open(adapter_id, data=data, uri=uri)
            entry.pinned = pin
            self._make_resident(entry, keep)
        metrics.ADAPTER_LOADS.labels(source).inc()
        return entry

    def fetch_cold(self, adapters: Iterable[tuple[str, str]]) -> None:
        """Download what the (adapter id, uri) pairs need from a remote store before their
        request takes its turn on the pipeline thread: called from any other thread, holding
        no lock, so other requests, ListAdapters and /metrics go on meanwhile; concurrent
        requests for one bundle or reference share its download (artifacts.BundleCache,
        fetching.RemoteAdapters)."""
        for adapter_id, uri in adapters:
            with self.lock:
                entry = self.entries.get(adapter_id)
            served = entry is not None and (
                not uri or (is_reference(uri) and entry.serves(parse_reference(uri)))
            )
            if not served:
                self.sources.fetch(adapter_id, uri)

    def unload(self, adapter_id: str) -> None:
        with self.lock:
            if adapter_id not in self.entries:
                raise NotFound("adapter", adapter_id)
            self._forget(adapter_id)

    def list(self) -> list[AdapterEntry]:
        with self.lock:
            return list(self.entries.values())

    def paths_in_use(self) -> set[Path]:
        """The bundle folders of the known adapters (a bounded cache must keep them)."""
        return {e.path for e in self.list()}

    def residency(self) -> metrics.Residency:
        entries = self.list()
        return metrics.Residency(
            resident=sorted(e.adapter_id for e in entries if e.resident),
            pinned=sum(e.pinned for e in entries),
            outside_slots=sum(e.resident and self.outside_slots(e) for e in entries),
            max_resident=self.max_resident,
        )

    def ensure_resident(
        self, adapter_id: str, keep: Keep = frozenset(), reference: str = ""
    ) -> AdapterEntry:
        """Resident adapter by id, loading it on demand from ``reference`` (fetched already:
        fetch_cold) or else the artifact store."""
        with self.lock:
            entry = self.entries.get(adapter_id)
            if entry is not None and reference and not entry.serves(parse_reference(reference)):
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} is loaded from {entry.source} (sha256 "
                    f"{entry.source_sha256}), not {reference}: name this one differently"
                )
            if entry is not None:
                if entry.resident:
                    metrics.ADAPTER_LOADS.labels("resident").inc()
                else:  # known, evicted earlier: its bundle is on this server's disk
                    with metrics.ADAPTER_LOAD_SECONDS.labels("store").time():
                        self._make_resident(entry, keep)
                    metrics.ADAPTER_LOADS.labels("store").inc()
                self.lru.move_to_end(adapter_id)
                return entry
        try:
            return self.register(adapter_id, uri=reference, keep=keep)
        except NotFound:
            if reference:
                raise
            raise NotFound(
                "adapter", adapter_id, "load it with LoadAdapter or put it in the artifact store"
            ) from None

    def resolve(self, adapters: list[AdapterRequest], keep: Keep) -> list[AdapterEntry]:
        """A request's adapters, resident, with no learned token defined twice."""
        if len(adapters) > self.max_resident:
            raise InvalidArgument(
                f"at most {self.max_resident} adapters per request on this server", "adapters"
            )
        entries = [self.ensure_resident(a.adapter_id, keep, a.source) for a in adapters]
        seen: dict[str, str] = {}
        for entry in entries:
            for token in entry.tokens:
                if token in seen:
                    raise InvalidArgument(
                        f"adapters {seen[token]!r} and {entry.adapter_id!r} both define the token "
                        f"{token}; use one of them per request",
                        "adapters",
                    )
                seen[token] = entry.adapter_id
        return entries

    def outside_slots(self, entry: AdapterEntry) -> bool:
        """Whether the adapter's LoRA weights were loaded by diffusers, not into a slot."""
        return entry.has_lora and not (self.slots is not None and self.slots.owns(entry.peft_name))

    def touch(self, entries: Iterable[AdapterEntry]) -> None:
        """Mark adapters as just used (the eviction order)."""
        for entry in entries:
            if entry.adapter_id in self.lru:
                self.lru.move_to_end(entry.adapter_id)

    # ------------------------------------------------------------------ residency
    def _make_resident(self, entry: AdapterEntry, keep: Keep = frozenset()) -> None:
        """Load the adapter's weights: into a pre-shaped slot when it fits, else generally."""
        refuse_non_finite(entry.adapter_id, {
            token: torch.cat(vectors) for token, vectors in entry.embeddings.items()
        })  # fmt: skip
        self._evict_for_one(keep)
        if entry.has_lora:
            self._load_weights(entry)
        if entry.embeddings:
            try:
                names = self.tokens.acquire(list(entry.embeddings.values()))
            except ValueError as err:
                self._drop_weights(entry)
                raise FailedPrecondition(f"adapter {entry.adapter_id!r}: {err}") from err
            entry.token_map = dict(zip(entry.embeddings, names, strict=True))
        entry.resident = True
        self.entries[entry.adapter_id] = entry
        self.lru[entry.adapter_id] = None
        self.lru.move_to_end(entry.adapter_id)

    def _load_weights(self, entry: AdapterEntry) -> None:
        state = bundles.read_bundle(entry.path, verify=False).lora_state_dict()
        refuse_non_finite(entry.adapter_id, state)
        pairs = lora_pairs(state)
        fits = self.slots is not None and self.slots.fits(pairs)
        slot = self.slots.acquire(entry.adapter_id) if fits else None
        try:
            if slot is not None:
                entry.peft_name = slot
                rank = self.slots.fill(slot, pairs)
                self.mixer.adapter_changed(slot, rank, self.slots.layers_for(slot, pairs))
            else:
                entry.peft_name = f"adapter-{entry.adapter_id}"
                self.pipe.load_lora_weights(
                    str(entry.path / bundles.LORA_FILE), adapter_name=entry.peft_name
                )
                self.mixer.refresh()  # take over the layers diffusers just made
        except Exception as err:
            if slot is not None:
                self.slots.release(slot)
            else:
                interop.discard_adapter(self.pipe, entry.peft_name)
            if out_of_memory(err):
                release_cached_memory()
                raise ResourceExhausted(
                    f"the device ran out of memory loading adapter {entry.adapter_id!r}: unload "
                    "adapters or lower --max-resident-adapters",
                    retry_after_seconds=5.0,
                ) from err
            raise FailedPrecondition(
                f"cannot apply adapter {entry.adapter_id!r} to this model: {err}"
            ) from err

    def _evict_for_one(self, keep: Keep = frozenset()) -> None:
        """Make room for one more resident adapter by evicting the least recently used
        (never a pinned one, nor one in ``keep``: the other adapters of the same batch)."""
        resident = [a for a in self.lru if self.entries[a].resident]
        while len(resident) >= self.max_resident:
            victim = next(
                (a for a in resident if not self.entries[a].pinned and a not in keep), None
            )
            if victim is None:
                raise FailedPrecondition(
                    f"all {self.max_resident} resident adapters are pinned; unload one first"
                )
            self._evict(victim)
            metrics.EVICTIONS.inc()
            resident.remove(victim)

    def _drop_weights(self, entry: AdapterEntry) -> None:
        if not entry.has_lora or not entry.peft_name:
            return
        if self.slots is not None and self.slots.owns(entry.peft_name):
            self.slots.release(entry.peft_name)  # overwritten by the next fill
        else:
            self.pipe.delete_adapters(entry.peft_name)
        self.mixer.adapter_changed(entry.peft_name)

    def _evict(self, adapter_id: str) -> None:
        """Drop the adapter's weights from the model; it stays known and reloads on demand."""
        entry = self.entries[adapter_id]
        if entry.resident:
            self._drop_weights(entry)
            self.tokens.release(list(entry.token_map.values()))
            entry.token_map = {}
        entry.resident = False
        log.info("adapter evicted", extra={"adapter_id": adapter_id})

    def _forget(self, adapter_id: str) -> None:
        if adapter_id in self.entries:
            self._evict(adapter_id)
        self.entries.pop(adapter_id, None)
        self.lru.pop(adapter_id, None)
