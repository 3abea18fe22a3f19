"""Adapter rows shared by the CPU and GPU benchmarks (no gRPC imports: the GPU script runs
where only the model stack is installed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench.common import interleaved_medians
from inference_service.engine import GeneratorEngine
from inference_service.requests import GenerationJob, GenerationSpec


def switch_to(engine: GeneratorEngine, request: GenerationSpec) -> None:
    """What a request does to its adapters before denoising: private token names in its
    prompt, its UNet and text-encoder weights in the mixer."""
    entries = [engine.adapters.entries[a.adapter_id] for a in request.adapters]
    engine._private_prompts(entries, request)
    for component in ("unet", "text_encoder"):
        engine.mixer.set(component, engine._lora_weights(entries, request, component))
    engine.mixer.clear()


def mixed_batches(
    engine: GeneratorEngine, spec, repeat: int, counts=(4, 8), sync=lambda: None
) -> list:
    """N requests with N different adapters and scales: one mixed batch vs one by one."""
    rows = []
    for count in counts:
        specs = [spec((f"a{i}", 0.6 + 0.1 * i)) for i in range(count)]
        for i, s in enumerate(specs):
            s.seed = i
        jobs = [GenerationJob(s) for s in specs]
        alone = [engine.generate(s)[0] for s in specs]
        together = [out[0] for out in engine.generate_batch(jobs)]
        difference = max(
            float(np.abs(_pixels(a) - _pixels(b)).mean())
            for a, b in zip(alone, together, strict=True)
        )
        timed = interleaved_medians({
            "sequential": lambda specs=specs: ([engine.generate(s) for s in specs], sync()),
            "batched": lambda jobs=jobs: (engine.generate_batch(jobs), sync()),
        }, repeat=max(3, repeat // 2))  # fmt: skip
        sequential, batched = timed["sequential"], timed["batched"]
        rows += [
            (f"{count} requests, {count} adapters, one after another", sequential, "ms"),
            (f"{count} requests, {count} adapters, one mixed batch", batched, "ms"),
            (f"  batched throughput / sequential ({count})", sequential / batched,
             "x (target >= 1.3 at 4)"),
            (f"  max mean abs pixel difference, batched vs alone ({count})", difference,
             "(target <= 1e-3)"),
        ]  # fmt: skip
    return rows


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)), dtype=np.float32) / 255
