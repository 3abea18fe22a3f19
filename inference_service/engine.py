"""The warm pipeline: denoising batches of requests, each with its own adapters and scales.

Resident adapters (adapters.py) stay loaded in the peft-wrapped denoiser and text encoders,
and the base weights never change. A request's adapters and scales are weights in the LoRA mixer
(mixing.py): setting them is an assignment, and requests that share size, steps, guidance and
scheduler (batching.plan) are denoised in one batch, each row with its own request's adapters.
A request's prompt is rewritten to the private names of its own adapters' learned tokens, so
a token means nothing in a request that does not name its adapter. Every method that touches
the pipeline runs on the one pipeline thread.
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from inference_service import metrics
from inference_service.adapter_sources import DEFAULT_CACHE_BYTES, AdapterEntry, AdapterSources
from inference_service.adapters import AdapterRegistry
from inference_service.batching import plan
from inference_service.fetching import FetchPolicy, RemoteAdapters
from inference_service.mixing import LoraMixer, row_weights
from inference_service.spec import (
    IMAGE_FORMATS,
    SCHEDULERS,
    GeneratedImage,
    GenerationJob,
    GenerationSpec,
    Outcome,
)
from loraforge_core import families
from loraforge_core.devices import out_of_memory, release_cached_memory
from loraforge_core.errors import Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted
from loraforge_core.objectstore import ObjectStore

log = logging.getLogger("loraforge.generator.engine")


@dataclass
class Resolved:
    """A request ready to denoise, worked out once: its resident adapters, its prompts with
    their learned tokens under private names, and each component's LoRA weights
    ``{peft adapter name: scale}`` (the request's scale, times the adapter's recommended scale
    where asked; the text encoders take the text-encoder scale)."""

    job: GenerationJob
    entries: list[AdapterEntry]
    prompt: str
    negative_prompt: str
    weights: dict[str, dict[str, float]]

    @property
    def spec(self) -> GenerationSpec:
        return self.job.spec


Batch = list[Resolved]


def build_engine(
    pipe, data_dir: Path, *, max_resident: int = 8, model_name: str = "",
    slot_rank: int = 16, extended_slots: bool = False, objects: ObjectStore | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES, fuse_adapters: bool = True,
    compile_backend: str | None = None, fetch_policy: FetchPolicy | None = None,
) -> GeneratorEngine:  # fmt: skip
    """The engine and its parts, each given what it uses: the LoRA mixer; the adapter sources
    (bytes, the data dir, the artifact store ``objects`` behind a cache of ``cache_bytes``,
    references fetched under ``fetch_policy``); the registry of resident adapters (slots of
    ``slot_rank``, at most ``max_resident``)."""
    family = families.of_pipeline(pipe)
    mixer = LoraMixer(pipe, family.components, fuse=fuse_adapters,
                      compiled=(family.denoiser,) if compile_backend else ())  # fmt: skip
    remote = RemoteAdapters(
        fetch_policy or FetchPolicy(), Path(data_dir) / "adapter-cache",
        store_bucket=getattr(objects, "bucket", ""),
    )  # fmt: skip
    sources = AdapterSources(
        pipe, data_dir, model_name, after_import=mixer.refresh, objects=objects,
        cache_bytes=cache_bytes, in_use=lambda: registry.paths_in_use(), remote=remote,
    )  # fmt: skip
    registry = AdapterRegistry(pipe, sources, mixer, max_resident=max_resident,
                               slot_rank=slot_rank, extended_slots=extended_slots)  # fmt: skip
    return GeneratorEngine(pipe, registry, mixer, compile_backend=compile_backend)


class GeneratorEngine:
    """Owns the pipeline and its adapters (``self.adapters``); ``build_engine`` makes one."""

    def __init__(
        self, pipe, adapters: AdapterRegistry, mixer: LoraMixer, *,
        compile_backend: str | None = None,
    ) -> None:  # fmt: skip
        self.pipe = pipe
        self.family = families.of_pipeline(pipe)
        pin_execution_device(pipe)
        self._mode_pipes = {"txt2img": pipe}  # img2img and inpainting share its modules
        # An inpainting model's denoiser takes the mask and the masked image too.
        denoiser = getattr(pipe, self.family.denoiser)
        self.inpainting_base = self.family.inpainting_denoiser(denoiser)
        self.lock = threading.Lock()
        # Requests swap the pipeline's scheduler: "default" means the model's own. One instance
        # per name, made on first use (1.5 ms each: 1-2% of a small render) and reused as a
        # pipeline reuses its own: set_timesteps resets a scheduler's state at every call.
        self.base_scheduler = (type(pipe.scheduler), dict(pipe.scheduler.config))
        self._schedulers: dict[str, Any] = {}
        self.default_size = self.family.native_resolution(denoiser, pipe.vae)
        self.mixer = mixer
        self.adapters = adapters
        if compile_backend:
            # After the slots exist: a change of adapters or scales then changes tensor values
            # (fused weights, gathered factors), not the graph, so nothing recompiles.
            getattr(pipe, self.family.denoiser).compile(backend=compile_backend)

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

    def generate_batch(self, jobs: list[GenerationJob]) -> list[Outcome]:
        """Serve any requests in as few denoising batches as ``batching.plan`` allows, each
        with its own adapters and scales (the server's queue plans its batches itself and
        calls ``serve_batch``)."""
        outcomes: list[Outcome] = [[] for _ in jobs]
        groups = plan([job.spec for job in jobs], max_adapters=self.adapters.max_resident)
        for indexes in groups:
            served = self.serve_batch([jobs[i] for i in indexes])
            for i, outcome in zip(indexes, served, strict=True):
                outcomes[i] = outcome
        return outcomes

    def serve_batch(self, jobs: list[GenerationJob]) -> list[Outcome]:
        """One denoising batch of requests that ``batching.plan`` put together; a request
        that cannot be served (an unknown adapter, say) gets its error and the others go on."""
        keep = {a.adapter_id for job in jobs for a in job.spec.adapters}
        outcomes: list[Outcome] = [[] for _ in jobs]
        ready: list[tuple[int, Resolved]] = []
        for index, job in enumerate(jobs):
            try:
                ready.append((index, self._resolve(job, keep)))
            except Exception as err:  # this request's own problem: the others go on
                outcomes[index] = err
        if not ready:
            return outcomes
        try:
            images: list[Outcome] = self._denoise([request for _, request in ready])
        except Exception as err:
            images = [_out_of_memory_refusal(err, [r.spec for _, r in ready])] * len(ready)
        for (index, _), result in zip(ready, images, strict=True):
            outcomes[index] = result
        return outcomes

    def _resolve(self, job: GenerationJob, keep: set[str]) -> Resolved:
        spec = job.spec
        self._check_mode(spec)
        entries = self.adapters.resolve(spec.adapters, keep)
        prompt, negative = spec.prompt, spec.negative_prompt
        for entry in entries:
            for public, private in entry.token_map.items():
                prompt = prompt.replace(public, private)
                negative = negative.replace(public, private)
        denoiser: dict[str, float] = {}
        text: dict[str, float] = {}
        for entry, adapter in zip(entries, spec.adapters, strict=True):
            if entry.has_lora:
                factor = entry.recommended_scale if adapter.use_recommended_scale else 1.0
                denoiser[entry.peft_name] = adapter.scale * factor
                text[entry.peft_name] = adapter.te_scale * factor
        texts = self.family.adapted_text_encoders
        weights = {self.family.denoiser: denoiser, **dict.fromkeys(texts, text)}
        return Resolved(job, entries, prompt, negative, weights)

    def _check_mode(self, spec: GenerationSpec) -> None:
        family = self.family
        allowed = family.schedulers
        if allowed is not None and spec.scheduler not in allowed:
            raise InvalidArgument(
                f"{family.title} models run {', '.join(allowed)} only (their pipeline's "
                f"own scheduler); {spec.scheduler!r} is for other families", "scheduler",
            )  # fmt: skip
        most, asked = family.max_text_tokens, spec.max_sequence_length
        if asked > most:
            length = (f"at most {most} tokens; asked for {asked}" if most
                      else "a fixed length: leave it 0 (it sets FLUX.1's T5 length)")  # fmt: skip
            raise InvalidArgument(
                f"{family.title} models encode prompts to {length}", "max_sequence_length"
            )
        if self.inpainting_base and spec.mode != "inpaint":
            raise FailedPrecondition(
                "this generator's base model is an inpainting model: send init_image and "
                "mask_image (inpainting), or use a text-to-image base for this request"
            )

    def _pipeline(self, mode: str):
        """The pipeline of a mode, built once from the warm one's modules (so the adapters,
        the mixer and the learned tokens apply to it as they do to text to image)."""
        if mode not in self._mode_pipes:
            import diffusers

            pipe = getattr(diffusers, self.family.pipelines[mode]).from_pipe(self.pipe)
            pipe.set_progress_bar_config(disable=True)
            pin_execution_device(pipe)
            self._mode_pipes[mode] = pipe
        return self._mode_pipes[mode]

    def _image_inputs(self, pipe, batch: Batch, first: GenerationSpec) -> dict:
        """The size, and for img2img and inpainting each image's init image (and mask)."""
        size = (first.width or self.default_size, first.height or self.default_size)
        inputs: dict = {"width": size[0], "height": size[1]}
        if first.mode == "txt2img":
            return inputs
        per_image = [r.spec for r in batch for _ in range(r.spec.num_images)]
        inputs["image"] = [s.init_image.resize(size, Image.Resampling.LANCZOS) for s in per_image]
        inputs["strength"] = first.denoise_strength
        if first.mode == "inpaint":
            inputs["mask_image"] = [s.mask_image.resize(size, Image.Resampling.NEAREST)
                                    for s in per_image]  # fmt: skip
        elif "width" not in inspect.signature(pipe.__call__).parameters:
            del inputs["width"], inputs["height"]  # SD's img2img takes the init image's size
        return inputs

    @torch.no_grad()
    def _through_vae(self, images: list) -> list:
        """Init images encoded and decoded: what a strength too small for one step returns.
        A VAE that overflows in fp16 (SDXL's: ``force_upcast``) runs in float32 for it, as
        the pipelines run it."""
        processor, vae = self.pipe.image_processor, self.pipe.vae
        dtype = vae.dtype
        upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            pixels = processor.preprocess(images).to(vae.device, dtype=vae.dtype)
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        finally:
            if upcast:
                vae.to(dtype)
        return processor.postprocess(decoded.float(), output_type="pil")

    def _guidance(self, spec: GenerationSpec) -> float:
        """The request's guidance scale, or the family's default."""
        return self.family.default_guidance if spec.guidance_scale is None else spec.guidance_scale

    def _scheduler(self, name: str):
        if name not in self._schedulers:
            import diffusers

            class_name, options = SCHEDULERS[name]
            base_class, config = self.base_scheduler
            cls = getattr(diffusers, class_name) if class_name else base_class
            self._schedulers[name] = cls.from_config(config, **options)
        return self._schedulers[name]

    def _encode_prompts(
        self, batch: Batch, guided: bool
    ) -> tuple[dict[str, torch.Tensor | None], list[torch.Generator], dict[str, list[float]]]:
        """Each request's prompts through the text encoders at its own scales; the batch's
        embeddings (the pipeline call's keyword arguments), one generator per image, and each
        adapter's denoiser scale per image."""
        family = self.family
        outputs: dict[str, list[torch.Tensor | None]] = {}
        generators: list[torch.Generator] = []
        denoiser_scales: dict[str, list[float]] = {}
        for request in batch:
            spec = request.spec
            for encoder in family.adapted_text_encoders:
                self.mixer.set(encoder, request.weights[encoder])
            encoded = family.pipeline_embeddings(
                self.pipe, request.prompt, request.negative_prompt, spec.num_images, guided,
                text_tokens=spec.max_sequence_length,
            )  # fmt: skip
            for name, tensor in encoded.items():
                outputs.setdefault(name, []).append(tensor)
            first_image = len(generators)
            seeds = range(spec.seed, spec.seed + spec.num_images)
            generators += [torch.Generator().manual_seed(seed) for seed in seeds]
            for name, scale in request.weights[family.denoiser].items():
                column = denoiser_scales.setdefault(name, [])
                column += [0.0] * (first_image - len(column)) + [scale] * spec.num_images
        for encoder in family.adapted_text_encoders:
            self.mixer.set(encoder, {})
        for column in denoiser_scales.values():
            column += [0.0] * (len(generators) - len(column))
        # unguided: no negative embeddings at all
        embeddings = {name: family.batch_embeddings(parts) for name, parts in outputs.items()}
        return embeddings, generators, denoiser_scales

    def _run(self, pipe, batch: Batch, first: GenerationSpec, guided: bool, inputs: dict,
             step_end: Callable) -> list:  # fmt: skip
        """The batch through ``pipe``, each row with its request's adapters and scales."""
        pipe.scheduler = self._scheduler(first.scheduler)
        try:
            embeddings, generators, scales = self._encode_prompts(batch, guided)
            # Classifier-free guidance runs the negative and the positive halves together.
            self.mixer.set(self.family.denoiser, {
                name: row_weights(column, repeats=2 if guided else 1)
                for name, column in scales.items()
            })  # fmt: skip
            return pipe(
                **embeddings,
                num_inference_steps=first.steps, guidance_scale=self._guidance(first),
                generator=generators, callback_on_step_end=step_end, **inputs,
            ).images  # fmt: skip
        finally:
            self.mixer.clear()

    def _denoise(self, batch: Batch) -> list[list[GeneratedImage]]:
        first = batch[0].spec
        guided = self.family.classifier_free(self.pipe, self._guidance(first))
        pipe = self._pipeline(first.mode)

        def step_end(pipe, step, timestep, kwargs):
            metrics.DENOISING_STEPS.inc()
            for request in batch:  # fewer steps than asked below strength 1
                request.job.on_step(step + 1, pipe.num_timesteps)
            if all(request.job.is_cancelled() for request in batch):
                raise Cancelled("the caller cancelled the request")
            return kwargs

        metrics.BATCH_REQUESTS.observe(len(batch))
        inputs = self._image_inputs(pipe, batch, first)
        with self.lock:
            started = time.perf_counter()
            if first.mode != "txt2img" and int(first.steps * first.denoise_strength) < 1:
                images = self._through_vae(inputs["image"])  # no denoising step would run
            else:
                images = self._run(pipe, batch, first, guided, inputs, step_end)
            log.debug(
                "generated",
                extra={"seconds": time.perf_counter() - started, "requests": len(batch)},
            )
        self.adapters.touch(entry for request in batch for entry in request.entries)
        metrics.IMAGES.inc(len(images))
        images = iter(images)
        return [
            [_encode(next(images), r.spec.seed + i, r.spec.output_format)
             for i in range(r.spec.num_images)]
            for r in batch
        ]  # fmt: skip


def pin_execution_device(pipe: Any) -> None:
    """Fix where ``pipe`` computes. diffusers looks it up by walking every module of every
    component at each call (group offloading may hang a hook anywhere), and the adapter slots'
    modules make that walk 6x longer: 13 ms a lookup on the tiny model, twice per generation
    (stock: 3 ms, once), 7% of the request. A served pipeline is never moved or offloaded."""
    if type(pipe).__dict__.get("_execution_device") is not _PINNED_DEVICE:
        device = pipe._execution_device
        pipe.__class__ = _pinned_class(type(pipe))
        pipe.__dict__["_pinned_device"] = device  # not setattr: a pipeline's registers config


_PINNED_DEVICE = property(lambda pipe: pipe.__dict__["_pinned_device"])


@functools.cache
def _pinned_class(cls: type) -> type:
    """``cls`` under its own name (family lookups go by it) with the device pinned."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__,
                                       "_execution_device": _PINNED_DEVICE})  # fmt: skip


def _encode(image, seed: int, fmt: str) -> GeneratedImage:
    buffer = io.BytesIO()
    options = {"quality": 95} if fmt != "png" else {}
    image.save(buffer, format=IMAGE_FORMATS[fmt], **options)
    return GeneratedImage(buffer.getvalue(), seed, image.width, image.height, fmt)


def _out_of_memory_refusal(err: Exception, specs: list[GenerationSpec]) -> Exception:
    """A batch that ran out of device memory: RESOURCE_EXHAUSTED that says what to lower (the
    server goes on); any other error as it is."""
    if not out_of_memory(err):
        return err
    release_cached_memory()
    images = sum(s.num_images for s in specs)
    first = specs[0]
    return ResourceExhausted(
        f"the device ran out of memory for {images} image(s) at {first.width or 'default'}x"
        f"{first.height or 'default'} with {len(specs)} request(s) in the batch: lower "
        "num_images, width and height, or retry when the server is less busy",
        retry_after_seconds=5.0,
    )
