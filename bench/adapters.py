"""Adapter rows shared by the CPU and GPU benchmarks (no gRPC imports: the GPU script runs
where only the model stack is installed)."""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import interleaved_medians, median_ms
from inference_service.engine import GeneratorEngine
from inference_service.spec import GenerationJob, GenerationSpec
from loraforge_core import families


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
    Returns the two medians in ms: (alternating, same). Both variants change the adapter set
    (they alternate), so with fusion on both pay the merge: ``merge_cost`` times it alone.
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


def merge_cost(
    engine: GeneratorEngine, repeat: int, sync: Callable[[], None] = lambda: None
) -> float:
    """Median ms to merge a changed adapter set into the UNet's fused weights: what the fused
    path pays once per change of set (two resident adapters, alternating, scales changing)."""
    names = [engine.adapters.entries[a].peft_name for a in ("a0", "a1")]
    flip = itertools.count()

    def merge() -> None:
        i = next(flip)
        engine.mixer.set(engine.family.denoiser, {names[i % 2]: 0.5 + (i % 3) * 0.25})
        sync()

    try:
        return median_ms(merge, repeat=repeat, warmup=2)
    finally:
        engine.mixer.clear()


def lora_overhead(
    engine: GeneratorEngine,
    spec: Callable[..., GenerationSpec],
    rounds: int,
    sync: Callable[[], None] = lambda: None,
    batch: int = 8,
) -> list[tuple[str, float, str]]:
    """What LoRA costs on the engine's request path: 0, 1 and 2 adapters (fused, and with
    fusion off: the batched LoRA path), and ``batch`` requests on ``batch`` distinct adapters
    in one mixed batch vs all on one adapter and vs one after another.

    Every variant is timed round-robin with an A/A twin of the base (the same generation
    timed as a second variant): its ratio is the noise floor of every ratio here, and a run
    where it reads outside 1.02x says so in its row.
    """
    one, two = spec(("a0", 1.0)), spec(("a0", 0.7), ("a1", 0.5))
    on_one = [GenerationJob(dataclasses.replace(spec(("a0", 0.8)), seed=i)) for i in range(batch)]
    distinct = [
        GenerationJob(dataclasses.replace(spec((f"a{i}", 0.6 + 0.05 * i)), seed=i))
        for i in range(batch)
    ]

    def unfused(request: GenerationSpec) -> None:
        engine.mixer.fuse = False
        try:
            engine.generate(request)
        finally:
            engine.mixer.fuse = True

    variants = {
        "base": lambda: engine.generate(spec()),
        "A/A": lambda: engine.generate(spec()),
        "1": lambda: engine.generate(one),
        "2": lambda: engine.generate(two),
        "1 unfused": lambda: unfused(one),
        "2 unfused": lambda: unfused(two),
        "on one": lambda: engine.generate_batch(on_one),
        "distinct": lambda: engine.generate_batch(distinct),
        "sequential": lambda: [engine.generate(job.spec) for job in distinct],
    }
    ms = interleaved_medians(
        {name: (lambda fn=fn: (fn(), sync())) for name, fn in variants.items()},
        repeat=rounds, warmup=2,
    )  # fmt: skip
    base = ms["base"]
    noise = ms["A/A"] / base
    resolved = abs(noise - 1) <= 0.02
    return [
        ("generate, base (no adapter)", base, "ms"),
        ("  A/A: the base timed twice, interleaved", noise,
         "x (within 1.02: ratios resolved)" if resolved
         else "x (OUTSIDE 1.02: this run cannot resolve the ratios below)"),
        ("generate, 1 adapter", ms["1"], "ms"),
        ("  overhead of 1 adapter vs base", ms["1"] / base, "x (target <= 1.05)"),
        ("generate, 2 adapters", ms["2"], "ms"),
        ("  overhead of 2 adapters vs base", ms["2"] / base, "x (target <= 1.10)"),
        ("  overhead of 1 adapter vs base, fusion off (batched LoRA path)",
         ms["1 unfused"] / base, "x"),
        ("  overhead of 2 adapters vs base, fusion off (batched LoRA path)",
         ms["2 unfused"] / base, "x"),
        (f"{batch} requests on one adapter, one batch", ms["on one"], "ms"),
        (f"{batch} requests on {batch} distinct adapters, one mixed batch", ms["distinct"], "ms"),
        (f"{batch} requests on {batch} distinct adapters, one after another", ms["sequential"],
         "ms"),
        (f"  {batch} distinct adapters vs {batch} on one adapter, throughput",
         ms["on one"] / ms["distinct"], "x (target >= 0.9)"),
        (f"  {batch} distinct adapters, one mixed batch vs one after another, throughput",
         ms["sequential"] / ms["distinct"], "x (target > 1)"),
    ]  # fmt: skip


def stock_same_loop(
    engine: GeneratorEngine,
    spec: Callable[..., GenerationSpec],
    stock_pipeline: Callable[[], Any],
    lora_paths: list[Any],
    rounds: int,
    sync: Callable[[], None] = lambda: None,
) -> list[tuple[str, float, str]]:
    """Ours against stock diffusers doing the same work, timed round-robin in one loop: no
    adapter; one adapter (ours on its default fused path) against stock fused and unloaded
    (diffusers' advice for one fixed adapter) and against stock unfused; two adapters against
    stock unfused with ``set_adapters``. Each stock variant is a pipeline of its own (fusing
    changes its weights), from ``stock_pipeline()``; each generation encodes a PNG, as ours
    answers one. The base's A/A twin, timed in the same loop, is every row's noise floor."""
    pipes = {name: stock_pipeline() for name in ("base", "fused", "unfused", "unfused 2")}
    for name, count in (("fused", 1), ("unfused", 1), ("unfused 2", 2)):
        for i, path in enumerate(lora_paths[:count]):
            pipes[name].load_lora_weights(path, adapter_name=f"x{i}")
        pipes[name].set_adapters([f"x{i}" for i in range(count)], [0.7, 0.5][:count])
    pipes["fused"].fuse_lora(adapter_names=["x0"], lora_scale=1.0)
    pipes["fused"].unload_lora_weights()
    base = spec()
    guidance = engine.family.default_guidance  # spec() leaves it unset: the family's

    def stock(pipe: Any) -> None:
        image = pipe(base.prompt, width=base.width, height=base.height,
                     num_inference_steps=base.steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(base.seed),
                     **families.of_pipeline(pipe).call_options(pipe)).images[0]  # fmt: skip
        image.save(io.BytesIO(), format="PNG")

    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    one, two = spec(("a0", 1.0)), spec(("a0", 0.7), ("a1", 0.5))
    variants = {
        "ours base": lambda: engine.generate(base),
        "ours base A/A": lambda: engine.generate(base),
        "ours 1": lambda: engine.generate(one),
        "ours 2": lambda: engine.generate(two),
        **{f"stock {name}": (lambda pipe=pipe: stock(pipe)) for name, pipe in pipes.items()},
    }
    ms = interleaved_medians(
        {name: (lambda fn=fn: (fn(), sync())) for name, fn in variants.items()},
        repeat=rounds, warmup=2,
    )  # fmt: skip
    floor = f"x (A/A of this loop: {ms['ours base A/A'] / ms['ours base']:.3f})"
    return [
        ("stock diffusers, same loop: base", ms["stock base"], "ms"),
        ("stock diffusers, same loop: 1 adapter fused and unloaded", ms["stock fused"], "ms"),
        ("stock diffusers, same loop: 1 adapter unfused", ms["stock unfused"], "ms"),
        ("stock diffusers, same loop: 2 adapters unfused", ms["stock unfused 2"], "ms"),
        ("ours / stock base, no adapter, same loop", ms["ours base"] / ms["stock base"], floor),
        ("ours / stock fused, 1 adapter, same loop", ms["ours 1"] / ms["stock fused"], floor),
        ("ours / stock unfused, 1 adapter, same loop", ms["ours 1"] / ms["stock unfused"],
         floor),
        ("ours / stock, 2 adapters (stock unfused), same loop",
         ms["ours 2"] / ms["stock unfused 2"], floor),
    ]  # fmt: skip


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
