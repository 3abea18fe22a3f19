"""Generator costs against stock diffusers, in one process and one run.

    python -m bench.serving [--model M] [--size 64] [--steps 10] [--out bench/results]

Any family the generator serves (``--model tiny-flux-random`` for the tiny FLUX.1).

Rows: generation with 0, 1 and 2 adapters (fused, and fusion off) beside an A/A twin of the
base, 8 requests on 8 distinct adapters in one mixed batch vs 8 on one adapter and vs one after
another (bench/adapters.py: lora_overhead), stock diffusers unfused and fused for reference, a
mixed batch of 4 vs the same requests alone (time and pixel difference), adapter activation
(our per-request switch vs diffusers ``set_adapters``), loading a never-seen adapter (ours vs
``load_lora_weights``), and Generate over gRPC on loopback vs the same generation in-process.
Every figure is a median after warm-up; ratios compare to a baseline measured in this run,
timed round-robin; torch's thread count is fixed for the run (``--threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from bench.adapters import (
    lora_overhead,
    merge_cost,
    mixed_batches,
    stock_same_loop,
    switch_cost,
)
from bench.common import interleaved_medians, median_ms, report
from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core import families
from loraforge_core.bundle import pack
from loraforge_core.launch import ServerProcess
from loraforge_core.models import load_pipeline, resolve_model
from trainer_service.training.lora import random_lora_bundle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--rounds", type=int, default=15, help="interleaved rounds of the LoRA overhead rows"
    )
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)),
        help="torch threads, fixed for the whole run",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    bundles = [
        random_lora_bundle(model, work / "generator" / "artifacts", seed=i, token=f"<b{i}>")
        for i in range(11)
    ]
    pipe = load_pipeline(model, device=device)
    engine = build_engine(pipe, work / "generator", max_resident=8)
    for i, bundle in enumerate(bundles[:8]):
        engine.adapters.register(f"a{i}", data=pack(bundle.path))
    size, steps, repeat = args.size, args.steps, args.repeat

    def spec(*adapters: tuple[str, float]) -> GenerationSpec:
        return GenerationSpec(
            prompt="a red circle",
            width=size,
            height=size,
            steps=steps,
            seed=0,
            adapters=[AdapterRequest(a, s) for a, s in adapters],
        )

    for warm in (spec(), spec(("a0", 1.0)), spec(("a0", 0.7), ("a1", 0.5))):
        engine.generate(warm)  # first calls pay one-time kernel selection; keep them out
    rows = lora_overhead(engine, spec, rounds=args.rounds)
    rows += stock_same_loop(
        engine, spec, lambda: load_pipeline(model, device=device),
        [b.lora_path for b in bundles[:2]], rounds=args.rounds,
    )  # fmt: skip
    one_adapter_ms = next(value for name, value, _ in rows if name == "generate, 1 adapter")

    stock_rows, switch_stock, stock_one_adapter = stock_reference(
        model, device, bundles[:2], size, steps, repeat
    )
    rows += stock_rows
    rows += mixed_batches(engine, spec, repeat, counts=(4,))

    # Switching between resident adapters: ours on the real request path (one-step renders,
    # alternating adapters vs one adapter) vs diffusers' set_adapters alone.
    alternating, same = switch_cost(
        engine, lambda name, scale: dataclasses.replace(spec((name, scale)), steps=1),
        repeat=3 * repeat,
    )  # fmt: skip
    merge = merge_cost(engine, repeat=3 * repeat)
    switch_ours = max(0.0, alternating - same) + merge
    rows += [
        ("one-step generate, alternating 2 adapters + scales", alternating, "ms"),
        ("one-step generate, same adapter and scale", same, "ms"),
        ("  alternating / same (both merge: they alternate)", alternating / same, "x"),
        (
            "merge a changed adapter set into the denoiser (fused path, once per change)",
            merge,
            "ms",
        ),
        ("switch adapter + scales (ours: alternating - same, + the merge)", switch_ours, "ms"),
        ("switch adapter + scales (diffusers set_adapters)", switch_stock, "ms"),
        ("  ours / one generation", switch_ours / one_adapter_ms, "x (target <= 0.01)"),
    ]

    # Loading a never-seen adapter: ours (verify + load + register) vs load_lora_weights.
    fresh = iter(bundles[8:] * 100)
    counter = iter(range(10**9))

    def load_ours() -> None:
        bundle = next(fresh)
        name = f"n{next(counter)}"
        engine.adapters.register(name, uri=f"artifacts/{bundle.path.name}")
        engine.adapters.unload(name)

    def load_stock() -> None:
        bundle = next(fresh)
        name = f"s{next(counter)}"
        pipe.load_lora_weights(bundle.lora_path, adapter_name=name)
        pipe.delete_adapters(name)

    load_o = median_ms(load_ours, repeat=repeat)
    load_s = median_ms(load_stock, repeat=repeat)
    rows += [
        ("load new adapter incl. unload (ours)", load_o, "ms"),
        ("load new adapter incl. delete (diffusers)", load_s, "ms"),
        ("  ours / diffusers", load_o / load_s, "x (target <= 0.25)"),
    ]

    # Serving overhead: Generate over gRPC on loopback vs the same call in-process.
    with ServerProcess("generator", data_dir=work / "server", model=args.model) as server:
        from loraforge_client import GeneratorClient

        with GeneratorClient(server.target, timeout=600) as client:
            client.load_adapter("a0", bundles[0].path)
            timed = interleaved_medians({
                "remote": lambda: client.generate(
                    "a red circle", adapters=[("a0", 1.0)], width=size, height=size,
                    steps=steps, seed=0),
                "local": lambda: engine.generate(spec(("a0", 1.0))),
            }, repeat=repeat)  # fmt: skip
    remote, local = timed["remote"], timed["local"]
    rows += [
        ("Generate over gRPC, 1 adapter", remote, "ms"),
        ("same generation, in-process engine", local, "ms"),
        ("  gRPC / in-process", remote / local, "x (target <= 1.05)"),
        ("  gRPC / stock diffusers in-process, same adapter", remote / stock_one_adapter, "x"),
    ]
    report("serving", rows, args.out)


def stock_reference(
    model, device, bundles, size: int, steps: int, repeat: int
) -> tuple[list, float, float]:
    """Stock diffusers on its own pipeline: switching with ``set_adapters``, base, one adapter
    unfused, and fused + unloaded (diffusers' advice for one fixed adapter), with what fusing
    costs each time the set changes."""
    import time

    pipe = load_pipeline(model, device=device)
    family = families.of_pipeline(pipe)
    denoiser, extra = family.denoiser, family.call_options(pipe)

    def run() -> None:
        pipe("a red circle", width=size, height=size, num_inference_steps=steps,
             output_type="np", generator=torch.Generator().manual_seed(0), **extra)  # fmt: skip

    base = median_ms(run, repeat=repeat)
    for i, bundle in enumerate(bundles):
        pipe.load_lora_weights(bundle.lora_path, adapter_name=f"x{i}")
    flip = iter(range(10**9))

    def switch() -> None:
        i = next(flip)
        pipe.set_adapters([f"x{i % 2}"], [{denoiser: 0.5 + (i % 3) * 0.25, "text_encoder": 1.0}])

    switch_ms = median_ms(switch, repeat=21, warmup=3)
    pipe.set_adapters(["x0"])
    unfused = median_ms(run, repeat=repeat)
    started = time.perf_counter()
    pipe.fuse_lora(adapter_names=["x0"])
    pipe.unload_lora_weights()
    fuse_ms = (time.perf_counter() - started) * 1000
    fused = median_ms(run, repeat=repeat)
    return (
        [
            ("stock diffusers: base", base, "ms"),
            ("stock diffusers: 1 adapter unfused", unfused, "ms"),
            ("  stock unfused / base", unfused / base, "x"),
            ("stock diffusers: fused and unloaded", fused, "ms"),
            ("  stock fused / base", fused / base, "x"),
            ("  fuse + unload, paid at each change of adapter set", fuse_ms, "ms"),
        ],
        switch_ms,
        unfused,
    )


if __name__ == "__main__":
    main()
