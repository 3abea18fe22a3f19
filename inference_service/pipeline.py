"""The warm pipeline and its adapters: one executor thread owns both.

Resident adapters stay loaded in the peft-wrapped UNet and text encoder, in pre-shaped slots
(slots.py: loading is a weight copy) or under their own names, and the base weights never
change. A request's adapters and scales are weights in the LoRA mixer (mixing.py): setting them
is an assignment, and requests that share size, steps, guidance and scheduler are denoised in
one batch, each row with its own request's adapters. Learned tokens live under private names
(slots.TokenPool), and a request's prompt is rewritten to the names of its own adapters' tokens,
so a token means nothing in a request that does not name its adapter.
"""

from __future__ import annotations

import io
import logging
import math
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference_service.mixing import LoraMixer, row_weights
from inference_service.slots import SlotPool, TokenPool
from loraforge_core import bundle as bundles
from loraforge_core import interop
from loraforge_core.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from loraforge_core.files import atomic_write_bytes, safe_child

log = logging.getLogger("loraforge.generator.pipeline")

SCHEDULERS = ("default", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras",
              "pndm")  # fmt: skip
MAX_SCALE = 4.0


@dataclass
class AdapterRequest:
    adapter_id: str
    scale: float = 1.0
    text_encoder_scale: float | None = None

    @property
    def te_scale(self) -> float:
        return self.scale if self.text_encoder_scale is None else self.text_encoder_scale


@dataclass
class GenerationSpec:
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "default"
    seed: int = 0
    num_images: int = 1
    adapters: list[AdapterRequest] = field(default_factory=list)
    output_format: str = "png"


def batch_key(spec: GenerationSpec) -> tuple:
    """What requests must share to be denoised in one batch."""
    return (spec.width, spec.height, spec.steps, spec.guidance_scale, spec.scheduler)


@dataclass
class GenerationJob:
    """One request in a denoising batch, with its progress and cancellation callbacks."""

    spec: GenerationSpec
    on_step: Callable[[int, int], None] = lambda step, total: None
    is_cancelled: Callable[[], bool] = lambda: False


@dataclass
class GeneratedImage:
    data: bytes
    seed: int
    width: int
    height: int
    format: str


@dataclass
class AdapterEntry:
    adapter_id: str
    source_format: str  # bundle, or what it was imported from: kohya | diffusers | ...
    path: Path
    tokens: list[str]
    embeddings: dict[str, torch.Tensor]
    rank: int
    size_bytes: int
    sha256: str
    has_lora: bool
    has_text_encoder: bool
    pinned: bool = False
    resident: bool = False
    peft_name: str = ""  # the name its weights have in the peft layers (a slot, or its own)
    token_map: dict[str, str] = field(default_factory=dict)  # learned token -> private name


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header = int.from_bytes(data[:8], "little")
    return 0 < header < len(data) and data[8:9] == b"{"


class GeneratorEngine:
    """Owns the pipeline; every method that touches it runs on the one executor thread."""

    def __init__(
        self, pipe, store_dir: Path, *, max_resident: int = 8, model_name: str = "",
        slot_rank: int = 16,
    ) -> None:  # fmt: skip
        self.pipe = pipe
        self.model_name = model_name
        self.store_dir = Path(store_dir)
        self.adapters_dir = self.store_dir / "adapters"
        self.max_resident = max_resident
        self.entries: dict[str, AdapterEntry] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.default_size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
        self.text_hidden = int(pipe.text_encoder.config.hidden_size)
        self.cross_dim = int(pipe.unet.config.cross_attention_dim)
        # Pre-shaped slots (rank slot_rank, default targets): loading becomes a weight copy.
        self.slots = SlotPool(pipe, max_resident, slot_rank) if slot_rank > 0 else None
        self.tokens = TokenPool(pipe)
        self.mixer = LoraMixer(pipe)

    # ------------------------------------------------------------------ adapters
    def _entry_from_bundle(self, adapter_id: str, path: Path) -> AdapterEntry:
        bundle = bundles.read_bundle(path)
        manifest = bundle.manifest
        if (manifest.text_hidden_size, manifest.cross_attention_dim) != (
            self.text_hidden,
            self.cross_dim,
        ):
            raise FailedPrecondition(
                f"adapter {adapter_id!r} was trained for a model with text hidden size "
                f"{manifest.text_hidden_size} and cross-attention dim "
                f"{manifest.cross_attention_dim}; this server's model has {self.text_hidden} "
                f"and {self.cross_dim}"
            )
        from safetensors import safe_open

        with safe_open(bundle.lora_path, "pt") as handle:  # key names only: the weights are
            lora_keys = list(handle.keys())  # read once, when the adapter becomes resident
        source_format = manifest.method.split(":", 1)[1] if ":" in manifest.method else "bundle"
        return AdapterEntry(
            adapter_id=adapter_id, source_format=source_format, path=path,
            tokens=manifest.tokens,
            embeddings=bundle.embeddings(), rank=manifest.rank, size_bytes=bundle.size_bytes(),
            sha256=bundle.sha256(), has_lora=bool(lora_keys),
            has_text_encoder=any(k.startswith("text_encoder.") for k in lora_keys),
        )  # fmt: skip

    def _import(self, adapter_id: str, source: Path) -> AdapterEntry:
        """A LoRA file in any supported format -> a bundle under adapters/<id> (via interop)."""
        from loraforge_core import interop

        folder = safe_child(self.adapters_dir, adapter_id)
        try:
            bundle = interop.import_file(
                source, self.pipe, self.adapters_dir / ".imports", base_model=self.model_name
            )
        except interop.ArchitectureMismatch as err:
            raise FailedPrecondition(f"adapter {adapter_id!r}: {err}") from err
        except interop.FormatError as err:
            raise InvalidArgument(str(err), "data") from err
        finally:
            self.mixer.refresh()  # the import loaded and dropped a temporary adapter
        shutil.rmtree(folder, ignore_errors=True)
        bundle.path.rename(folder)
        return self._entry_from_bundle(adapter_id, folder)

    def register(
        self, adapter_id: str, *, data: bytes | None = None, uri: str = "", pin: bool = False,
        keep: frozenset[str] | set[str] = frozenset(),
    ) -> AdapterEntry:  # fmt: skip
        """Make an adapter known and resident (from inline bytes or the artifact store)."""
        with self.lock:
            if adapter_id in self.entries:
                self._unload(adapter_id)
            if data is not None:
                entry = self._store_inline(adapter_id, data)
            else:
                entry = self._entry_from_store(adapter_id, uri or adapter_id)
            entry.pinned = pin
            self._make_resident(entry, keep)
            return entry

    def _store_inline(self, adapter_id: str, data: bytes) -> AdapterEntry:
        folder = safe_child(self.adapters_dir, adapter_id)
        if bundles.is_archive(data):
            try:
                bundles.unpack(data, folder)
            except bundles.BundleError as err:
                raise InvalidArgument(str(err), "data") from err
            return self._entry_from_bundle(adapter_id, folder)
        if _is_safetensors(data):
            upload = self.adapters_dir / ".uploads" / f"{adapter_id}.safetensors"
            atomic_write_bytes(upload, data)
            try:
                return self._import(adapter_id, upload)
            finally:
                upload.unlink(missing_ok=True)
        raise InvalidArgument(
            "give a bundle archive or a LoRA .safetensors file (no pickle)", "data"
        )

    def _entry_from_store(self, adapter_id: str, uri: str) -> AdapterEntry:
        """From a path in the store; a bare id also finds the trainer's ``artifacts/<id>``."""
        relative = uri.removeprefix("file://")
        try:
            path = safe_child(self.store_dir, relative)
            if not path.exists() and "/" not in relative:
                path = safe_child(self.store_dir / "artifacts", relative)
        except ValueError as err:
            raise InvalidArgument(str(err), "uri") from err
        if (path / bundles.MANIFEST_FILE).is_file():
            try:
                return self._entry_from_bundle(adapter_id, path)
            except bundles.BundleError as err:
                raise InvalidArgument(str(err), "uri") from err
        if path.is_file() and path.suffix == ".safetensors":
            return self._import(adapter_id, path)
        raise NotFound("adapter", adapter_id, f"nothing loadable at {relative!r} in the store")

    def _make_resident(
        self, entry: AdapterEntry, keep: frozenset[str] | set[str] = frozenset()
    ) -> None:
        """Load the adapter's weights: into a pre-shaped slot when it fits, else generally."""
        self._evict_for_one(keep)
        if entry.has_lora:
            pairs = interop.lora_pairs(
                bundles.read_bundle(entry.path, verify=False).lora_state_dict()
            )
            slot = (
                self.slots.acquire(entry.adapter_id)
                if (self.slots is not None and self.slots.fits(pairs))
                else None
            )
            try:
                if slot is not None:
                    self.slots.fill(slot, pairs)
                    entry.peft_name = slot
                else:
                    entry.peft_name = f"adapter-{entry.adapter_id}"
                    self.pipe.load_lora_weights(
                        str(entry.path / bundles.LORA_FILE), adapter_name=entry.peft_name
                    )
                    self.mixer.refresh()  # hook the layers diffusers just made
            except Exception as err:
                if slot is not None:
                    self.slots.release(slot)
                else:
                    interop.discard_adapter(self.pipe, entry.peft_name)
                raise FailedPrecondition(
                    f"cannot apply adapter {entry.adapter_id!r} to this model: {err}"
                ) from err
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

    def _evict_for_one(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Make room for one more resident adapter by evicting the least recently used
        (never a pinned one, nor one in ``keep``: the other adapters of the same request)."""
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
            resident.remove(victim)

    def _drop_weights(self, entry: AdapterEntry) -> None:
        if not entry.has_lora or not entry.peft_name:
            return
        if entry.peft_name.startswith("slot-"):
            assert self.slots is not None
            self.slots.release(entry.peft_name)  # overwritten by the next fill
        else:
            self.pipe.delete_adapters(entry.peft_name)

    def _evict(self, adapter_id: str) -> None:
        """Drop the adapter's weights from the model; it stays known and reloads on demand."""
        entry = self.entries[adapter_id]
        if entry.resident:
            self._drop_weights(entry)
            self.tokens.release(list(entry.token_map.values()))
            entry.token_map = {}
        entry.resident = False
        log.info("adapter evicted", extra={"adapter_id": adapter_id})

    def _unload(self, adapter_id: str) -> None:
        if adapter_id in self.entries:
            self._evict(adapter_id)
        self.entries.pop(adapter_id, None)
        self.lru.pop(adapter_id, None)

    def unload(self, adapter_id: str) -> None:
        with self.lock:
            if adapter_id not in self.entries:
                raise NotFound("adapter", adapter_id)
            self._unload(adapter_id)

    def list(self) -> list[AdapterEntry]:
        with self.lock:
            return list(self.entries.values())

    def ensure_resident(
        self, adapter_id: str, keep: frozenset[str] | set[str] = frozenset()
    ) -> AdapterEntry:
        """Resident adapter by id, loading it from the artifact store on demand."""
        with self.lock:
            entry = self.entries.get(adapter_id)
            if entry is not None:
                if not entry.resident:
                    self._make_resident(entry, keep)
                self.lru.move_to_end(adapter_id)
                return entry
        try:
            return self.register(adapter_id, keep=keep)
        except NotFound:
            raise NotFound(
                "adapter", adapter_id, "load it with LoadAdapter or put it in the artifact store"
            ) from None

    # ------------------------------------------------------------------ generation
    def _scheduler(self, name: str):
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerAncestralDiscreteScheduler,
            EulerDiscreteScheduler,
            PNDMScheduler,
        )

        config = self.base_scheduler_config
        if name == "default":
            return type(self.pipe.scheduler).from_config(config)
        if name == "dpmpp_2m_karras":
            return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
        classes = {
            "ddim": DDIMScheduler,
            "euler": EulerDiscreteScheduler,
            "euler_ancestral": EulerAncestralDiscreteScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler,
            "pndm": PNDMScheduler,
        }
        return classes[name].from_config(config)

    def _resolve(self, spec: GenerationSpec, keep: set[str]) -> list[AdapterEntry]:
        """The request's adapters, resident, with no learned token defined twice."""
        if len(spec.adapters) > self.max_resident:
            raise InvalidArgument(
                f"at most {self.max_resident} adapters per request on this server", "adapters"
            )
        entries = [self.ensure_resident(a.adapter_id, keep=keep) for a in spec.adapters]
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

    @staticmethod
    def _private_prompts(entries: list[AdapterEntry], spec: GenerationSpec) -> tuple[str, str]:
        """The request's prompts with its adapters' learned tokens under their private names."""
        prompt, negative = spec.prompt, spec.negative_prompt
        for entry in entries:
            for public, private in entry.token_map.items():
                prompt = prompt.replace(public, private)
                negative = negative.replace(public, private)
        return prompt, negative

    @staticmethod
    def _lora_weights(
        entries: list[AdapterEntry], spec: GenerationSpec, component: str
    ) -> dict[str, float]:
        return {
            e.peft_name: (a.scale if component == "unet" else a.te_scale)
            for e, a in zip(entries, spec.adapters, strict=True)
            if e.has_lora
        }

    def generate(
        self,
        spec: GenerationSpec,
        on_step: Callable[[int, int], None] = lambda step, total: None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> list[GeneratedImage]:
        outcome = self.generate_batch([GenerationJob(spec, on_step, is_cancelled)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(self, jobs: list[GenerationJob]) -> list[list[GeneratedImage] | Exception]:
        """Serve requests that share size, steps, guidance and scheduler in one denoising
        batch, each with its own adapters and scales; a request that cannot be served (an
        unknown adapter, say) gets its error and the others go on. Jobs that do not share
        those settings are served in separate batches."""
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(batch_key(job.spec), []).append(index)
        if len(groups) > 1:
            outcomes: list[list[GeneratedImage] | Exception] = [[] for _ in jobs]
            for indexes in groups.values():
                served = self.generate_batch([jobs[i] for i in indexes])
                for i, outcome in zip(indexes, served, strict=True):
                    outcomes[i] = outcome
            return outcomes
        keep = {a.adapter_id for job in jobs for a in job.spec.adapters}
        outcomes: list[list[GeneratedImage] | Exception] = [[] for _ in jobs]
        ready: list[tuple[int, GenerationJob, list[AdapterEntry]]] = []
        for index, job in enumerate(jobs):
            try:
                ready.append((index, job, self._resolve(job.spec, keep)))
            except Exception as err:  # this request's own problem: the others go on
                outcomes[index] = err
        if not ready:
            return outcomes
        try:
            images = self._denoise([(job, entries) for _, job, entries in ready])
        except Exception as err:
            images = [err] * len(ready)
        for (index, _, _), result in zip(ready, images, strict=True):
            outcomes[index] = result
        return outcomes

    def _encode_prompts(
        self, batch: list[tuple[GenerationJob, list[AdapterEntry]]], guided: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Generator], dict[str, list[float]]]:
        """Each request's prompts through the text encoder at its own scales; the batch's
        embeddings, one generator per image, and each adapter's UNet scale per image."""
        device = self.pipe._execution_device
        positives, negatives, generators = [], [], []
        unet_scales: dict[str, list[float]] = {}
        for job, entries in batch:
            spec = job.spec
            prompt, negative = self._private_prompts(entries, spec)
            self.mixer.set("text_encoder", self._lora_weights(entries, spec, "text_encoder"))
            positive, negative_embeds = self.pipe.encode_prompt(
                prompt, device, spec.num_images, guided, negative or None
            )
            positives.append(positive)
            negatives.append(negative_embeds)
            first_image = len(generators)
            seeds = range(spec.seed, spec.seed + spec.num_images)
            generators += [torch.Generator().manual_seed(seed) for seed in seeds]
            for name, scale in self._lora_weights(entries, spec, "unet").items():
                column = unet_scales.setdefault(name, [])
                column += [0.0] * (first_image - len(column)) + [scale] * spec.num_images
        self.mixer.set("text_encoder", {})
        for column in unet_scales.values():
            column += [0.0] * (len(generators) - len(column))
        return (
            torch.cat(positives),
            torch.cat(negatives) if guided else None,
            generators,
            unet_scales,
        )

    def _denoise(
        self, batch: list[tuple[GenerationJob, list[AdapterEntry]]]
    ) -> list[list[GeneratedImage]]:
        first = batch[0][0].spec
        guided = first.guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

        def step_end(pipe, step, timestep, kwargs):
            for job, _ in batch:
                job.on_step(step + 1, first.steps)
            if all(job.is_cancelled() for job, _ in batch):
                raise Cancelled("the caller cancelled the request")
            return kwargs

        with self.lock:
            self.pipe.scheduler = self._scheduler(first.scheduler)
            try:
                positive, negative, generators, unet_scales = self._encode_prompts(batch, guided)
                # Classifier-free guidance runs the negative and the positive halves together.
                device = self.pipe._execution_device
                self.mixer.set("unet", {
                    name: row_weights(column, repeats=2 if guided else 1, device=device)
                    for name, column in unet_scales.items()
                })  # fmt: skip
                started = time.perf_counter()
                result = self.pipe(
                    prompt_embeds=positive, negative_prompt_embeds=negative,
                    width=first.width or self.default_size,
                    height=first.height or self.default_size,
                    num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
                    generator=generators, callback_on_step_end=step_end,
                )  # fmt: skip
            finally:
                self.mixer.clear()
            log.debug(
                "generated",
                extra={"seconds": time.perf_counter() - started, "requests": len(batch)},
            )
            for _, entries in batch:
                for entry in entries:
                    if entry.adapter_id in self.lru:
                        self.lru.move_to_end(entry.adapter_id)
        images = iter(result.images)
        return [
            [self._encode(next(images), job.spec.seed + i, job.spec.output_format)
             for i in range(job.spec.num_images)]
            for job, _ in batch
        ]  # fmt: skip

    @staticmethod
    def _encode(image, seed: int, fmt: str) -> GeneratedImage:
        buffer = io.BytesIO()
        pil_format = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        image.save(buffer, format=pil_format, **({"quality": 95} if fmt != "png" else {}))
        return GeneratedImage(buffer.getvalue(), seed, image.width, image.height, fmt)


_ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_adapter_id(adapter_id: str, field_name: str) -> None:
    if not _ADAPTER_ID.match(adapter_id):
        raise InvalidArgument(
            "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field_name,
        )


def validate_spec(
    spec: GenerationSpec,
    *,
    max_side: int = 1024,
    max_steps: int = 150,
    max_images: int = 8,
    max_prompt: int = 2000,
) -> None:
    from loraforge_core.errors import Violations

    v = Violations()
    v.check(bool(spec.prompt.strip()), "prompt", "give a prompt")
    v.check(len(spec.prompt) <= max_prompt, "prompt", f"at most {max_prompt} characters")
    for name in ("prompt", "negative_prompt"):
        v.check(
            TokenPool.PREFIX not in getattr(spec, name),
            name,
            f"{TokenPool.PREFIX!r} is reserved for the server's token names",
        )
    v.check(
        len(spec.negative_prompt) <= max_prompt,
        "negative_prompt",
        f"at most {max_prompt} characters",
    )
    for name in ("width", "height"):
        value = getattr(spec, name)
        v.check(
            value == 0 or (value % 8 == 0 and 8 <= value <= max_side),
            name,
            f"a multiple of 8 in 8..{max_side} (0: the model's size)",
        )
    v.check(1 <= spec.steps <= max_steps, "num_inference_steps", f"in 1..{max_steps}")
    v.check(
        math.isfinite(spec.guidance_scale) and 0 <= spec.guidance_scale <= 50,
        "guidance_scale",
        "in 0..50",
    )
    v.check(1 <= spec.num_images <= max_images, "num_images", f"in 1..{max_images}")
    v.check(spec.scheduler in SCHEDULERS, "scheduler", f"one of {SCHEDULERS}")
    ids = [a.adapter_id for a in spec.adapters]
    v.check(len(ids) == len(set(ids)), "adapters", "name each adapter once")
    v.check(len(ids) <= 8, "adapters", "at most 8 adapters per request")
    for i, adapter in enumerate(spec.adapters):
        v.check(
            bool(_ADAPTER_ID.match(adapter.adapter_id)),
            f"adapters[{i}].adapter_id",
            "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
        for name, value in (("scale", adapter.scale), ("text_encoder_scale", adapter.te_scale)):
            v.check(
                math.isfinite(value) and -MAX_SCALE <= value <= MAX_SCALE,
                f"adapters[{i}].{name}",
                f"in [-{MAX_SCALE:g}, {MAX_SCALE:g}]",
            )
    v.raise_if_any()
