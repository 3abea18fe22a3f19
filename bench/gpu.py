"""GPU figures on the SD 2.1-base, SDXL, FLUX.1-dev and Z-Image-Turbo architectures with random
weights (no download).

    bash bench/gpu.sh            # on a GPU machine: SD 2.1, SDXL, FLUX.1-dev, Z-Image-Turbo
    python -m bench.gpu --arch tiny --size 64 --dtype fp32 --device cpu   # syntax check on CPU
    python -m bench.gpu --arch tiny-sdxl --size 64 --dtype fp32 --device cpu
    python -m bench.gpu --arch tiny-flux --size 64 --dtype fp32 --device cpu
    python -m bench.gpu --arch tiny-zimage --size 64 --dtype fp32 --device cpu

Reports denoising steps/s with 0, 1 and 4 adapters, the time to switch between resident
adapters and to load a new one (ours and diffusers'), a mixed batch of 4 requests with 4
adapters vs the same requests one after another, the LoRA overhead rows of the CPU bench
(1 and 2 adapters fused and with fusion off, 8 distinct adapters in one batch vs 8 on one,
beside an A/A twin of the base), LoRA training steps/s (batch 1, where the trainer runs the
model's family), and peak GPU memory. The model is saved in the benchmark's dtype (FLUX.1-dev
is 67 GB in fp32, 34 GB in bf16).
Random weights give real shapes and real costs, not meaningful images.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from bench.adapters import (
    lora_overhead,
    merge_cost,
    mixed_batches,
    stock_same_loop,
    switch_cost,
)
from bench.common import median_ms, report
from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core import families
from loraforge_core.architectures import ARCHITECTURES
from loraforge_core.bundle import pack
from loraforge_core.families import flux, zimage
from loraforge_core.models import build_pipeline, load_pipeline
from trainer_service.training.lora import random_lora_bundle

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Each architecture's pipeline with random weights (seed 0).
BUILDERS = {
    **{
        name: lambda arch=arch: build_pipeline(arch, seed=0) for name, arch in ARCHITECTURES.items()
    },
    "tiny-flux": lambda: flux.build_tiny(0),
    "flux-dev": lambda: flux.build_tiny(0, flux.FLUX_DEV),
    "tiny-zimage": lambda: zimage.build_tiny(0),
    "zimage-turbo": lambda: zimage.build_tiny(0, zimage.Z_IMAGE_TURBO),
}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd21-base", choices=sorted(BUILDERS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in training")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model_dir = work / "model"
    BUILDERS[args.arch]().to(DTYPES[args.dtype]).save_pretrained(model_dir)
    print(f"built {args.arch} in {time.monotonic() - started:.0f}s", flush=True)
    bundles = [
        random_lora_bundle(str(model_dir), work / "store", seed=i, token=f"<g{i}>", rank=8)
        for i in range(10)
    ]
    print(f"made adapters at {time.monotonic() - started:.0f}s", flush=True)
    rows = serving_rows(model_dir, work, bundles, args)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if "trainer" in (families.detect(str(model_dir)) or families.SD).services:
        rows += train_rows(model_dir, args)
    rows.append(("wall time of this script", time.monotonic() - started, "s"))
    report(f"gpu-{args.arch}-{args.size}", rows, args.out)


def serving_rows(
    model_dir: Path, work: Path, bundles: list, args: argparse.Namespace
) -> list[tuple[str, float, str]]:
    pipe = load_pipeline(str(model_dir), device=args.device, dtype=DTYPES[args.dtype])
    engine = build_engine(pipe, work, max_resident=8)
    for i in range(8):
        engine.adapters.register(f"a{i}", data=pack(bundles[i].path))

    def spec(n: int) -> GenerationSpec:
        return GenerationSpec(
            prompt="a photo",
            width=args.size,
            height=args.size,
            steps=args.steps,
            seed=0,
            adapters=[AdapterRequest(f"a{i}", 0.8) for i in range(n)],
        )

    def generate(n: int) -> None:
        engine.generate(spec(n))
        synchronize()

    for n in (0, 1, 4):  # first calls pay one-time kernel selection; keep them out
        generate(n)
    family = families.of_pipeline(pipe)
    guidance = "CFG" if family.classifier_free(pipe, family.default_guidance) else "no CFG"
    rows: list[tuple[str, float, str]] = []
    base_ms = None
    for n in (0, 1, 4):
        ms = median_ms(lambda n=n: generate(n), repeat=3, warmup=1)
        base_ms = base_ms or ms
        rows.append(
            (
                f"denoising steps/s, {n} adapters ({args.size}px, {guidance})",
                args.steps / ms * 1000,
                "steps/s",
            )
        )
        rows.append((f"  {n} adapters vs base", ms / base_ms, "x"))

    def one_step(name: str, scale: float) -> GenerationSpec:
        return dataclasses.replace(spec(0), steps=1, adapters=[AdapterRequest(name, scale)])

    alternating, same = switch_cost(engine, one_step, repeat=9, sync=synchronize)
    rows += [
        ("one-step generate, alternating 2 adapters + scales", alternating, "ms"),
        ("one-step generate, same adapter and scale", same, "ms"),
        ("  switch resident adapter + scales (alternating - same)", alternating - same, "ms"),
        (
            "merge a changed adapter set into the UNet (fused path, once per change)",
            merge_cost(engine, repeat=9, sync=synchronize),
            "ms",
        ),
    ]

    def one_adapter_spec(*adapters: tuple[str, float]) -> GenerationSpec:
        request = spec(0)
        request.adapters = [AdapterRequest(a, s) for a, s in adapters]
        return request

    rows += mixed_batches(engine, one_adapter_spec, 3, counts=(4,), sync=synchronize)
    rows += lora_overhead(engine, one_adapter_spec, rounds=3, sync=synchronize)
    rows += stock_same_loop(
        engine, one_adapter_spec,
        lambda: load_pipeline(str(model_dir), device=args.device, dtype=DTYPES[args.dtype]),
        [b.lora_path for b in bundles[:2]], rounds=3, sync=synchronize,
    )  # fmt: skip
    fresh = iter(bundles[8:] * 50)
    counter = iter(range(10**9))

    def load_ours() -> None:
        name = f"n{next(counter)}"
        engine.adapters.register(name, uri=str(next(fresh).path.relative_to(work)))
        engine.adapters.unload(name)
        synchronize()

    def load_stock() -> None:
        name = f"s{next(counter)}"
        pipe.load_lora_weights(next(fresh).lora_path, adapter_name=name)
        pipe.delete_adapters(name)
        synchronize()

    rows.append(("load new adapter + unload (ours)", median_ms(load_ours, repeat=5), "ms"))
    rows.append(("load new adapter + delete (diffusers)", median_ms(load_stock, repeat=5), "ms"))
    if torch.cuda.is_available():
        rows.append(("peak GPU memory, serving", torch.cuda.max_memory_allocated() / 2**20, "MiB"))
    return rows


def train_rows(model_dir: Path, args: argparse.Namespace) -> list[tuple[str, float, str]]:
    from PIL import Image

    from trainer_service.config import TrainingConfig
    from trainer_service.events import ListReporter, Progress
    from trainer_service.training.data import InstanceExample
    from trainer_service.training.trainer import RunPaths, Trainer

    precision = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}[args.dtype]
    images = [
        InstanceExample(Image.new("RGB", (args.size, args.size), c), f"{c}.png")
        for c in ("red", "green", "blue")
    ]
    # PTI where the family offers it; DreamBooth-LoRA (no inversion phase) where not (Z-Image).
    family = families.detect(str(model_dir))
    pti = family is None or "pti" in family.methods
    label, phases = ("PTI", ("inversion", "tuning")) if pti else ("DreamBooth-LoRA", ("tuning",))
    method = (
        {}
        if pti
        else {
            "method": "dreambooth_lora",
            "placeholder_tokens": [],
            "initializer_tokens": [],
            "instance_prompt": "a photo of sks",
        }
    )
    config = TrainingConfig(
        pretrained_model_name_or_path=str(model_dir),
        max_train_steps_ti=args.train_steps if pti else 0, max_train_steps_tuning=args.train_steps,
        save_steps=10**6, resolution=args.size, mixed_precision=precision,
        gradient_accumulation_steps=1, seed=0, gradient_checkpointing=args.gradient_checkpointing,
        device="cpu" if args.device == "cpu" else "auto", **method,
    )  # fmt: skip
    reporter = ListReporter()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(config, images, RunPaths(Path(tmp) / "c", Path(tmp) / "a"), reporter).run()
    rows = []
    for phase in phases:
        last = [e for e in reporter.events if isinstance(e, Progress) and e.phase == phase][-1]
        rows.append((f"{label} {phase} steps/s (batch 1, {args.size}px, {precision})",
                     last.steps_per_second, "steps/s"))  # fmt: skip
    if torch.cuda.is_available():
        rows.append(("peak GPU memory, training", torch.cuda.max_memory_allocated() / 2**20, "MiB"))
    return rows


if __name__ == "__main__":
    main()
