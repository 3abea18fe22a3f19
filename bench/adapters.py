"""Adapter rows shared by the CPU and GPU benchmarks (no gRPC imports: the GPU script runs
where only the model stack is installed)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable

import numpy as np
from PIL import Image

from bench.common import interleaved_medians
from inference_service.engine import GeneratorEngine
from inference_service.requests import GenerationJob, GenerationSpec


def switch_cost(
    engine: GeneratorEngine,
    request: Callable[[str, float], GenerationSpec],
    repeat: int,
    sync: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """What switching between resident adapters costs on the engine's real request path.

    ``engine.generate`` of one request at a time, alternating two adapters at changing scales,
    timed round-robin against the same adapter at the same scale every time; ``request``
    should make a short render (one denoising step) so that the switch is not lost in it.
    Returns the two medians in ms: (alternating, same).
    """
    flip = itertools.count()

    def alternating() -> None:
        i = next(flip)
        engine.generate(request(f"a{i % 2}", 0.5 + (i % 3) * 0.25))
        sync()

    def same() -> None:
        engine.generate(request("a0", 1.0))
        sync()

    timed = interleaved_medians({"alternating": alternating, "same": same}, repeat=repeat)
    return timed["alternating"], timed["same"]


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
