"""Slots on extended LoRA's targets (``--adapter-slot-targets extended``) vs the default ones.

Two engines on two copies of the model, one per slot layout. Rows: loading an extended (LoCon)
adapter, a copy into a slot with extended slots and diffusers' general path with default ones;
loading a plain adapter (a copy either way, into more zero layers with extended slots); and
generation with plain adapters, alone and in a mixed batch, where the extended slots' unused
layers must cost nothing (the mixer skips them). Times are medians of round-robin runs.

    python -m bench.slots [--model ""] [--size 64] [--steps 10] [--repeat 7]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch

from bench.common import interleaved_medians, report
from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.models import load_pipeline, resolve_model
from trainer_service.training.lora import random_lora_bundle

PLAIN_ADAPTERS = 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-slots-"))
    plain = [pack(random_lora_bundle(model, work / "b", seed=i, token=f"<p{i}>").path)
             for i in range(PLAIN_ADAPTERS)]  # fmt: skip
    locon = pack(random_lora_bundle(model, work / "b", seed=9, token="<c>", extended=True).path)
    engines = {}
    for layout in ("default", "extended"):
        engines[layout] = engine = build_engine(
            load_pipeline(model, device=device), work / layout, max_resident=PLAIN_ADAPTERS + 1,
            extended_slots=layout == "extended",
        )  # fmt: skip
        for i, data in enumerate(plain):
            engine.adapters.register(f"p{i}", data=data)
    counter = itertools.count()

    def load(layout: str, data: bytes) -> None:
        name = f"n{next(counter)}"
        engines[layout].adapters.register(name, data=data)
        engines[layout].adapters.unload(name)

    loads = interleaved_medians({
        f"{kind} {layout}": lambda layout=layout, data=data: load(layout, data)
        for kind, data in (("locon", locon), ("plain", plain[0])) for layout in engines
    }, repeat=args.repeat)  # fmt: skip

    def spec(index: int, *adapters: tuple[str, float]) -> GenerationSpec:
        return GenerationSpec(
            "a red circle", width=args.size, height=args.size, steps=args.steps, seed=index,
            adapters=[AdapterRequest(a, s) for a, s in adapters],
        )  # fmt: skip

    one = spec(0, ("p0", 0.8))
    mixed = [GenerationJob(spec(i, (f"p{i}", 0.5 + 0.1 * i))) for i in range(PLAIN_ADAPTERS)]
    renders = interleaved_medians({
        f"{kind} {layout}": lambda engine=engine, run=run: run(engine)
        for kind, run in (("one", lambda e: e.generate(one)),
                          ("mixed", lambda e: e.generate_batch(mixed)))
        for layout, engine in engines.items()
    }, repeat=args.repeat)  # fmt: skip
    rows = [
        ("load + unload a LoCon adapter, extended slots (copy)", loads["locon extended"], "ms"),
        ("load + unload a LoCon adapter, default slots (general path)", loads["locon default"],
         "ms"),
        ("  extended / default", loads["locon extended"] / loads["locon default"], "x"),
        ("load + unload a plain adapter, extended slots", loads["plain extended"], "ms"),
        ("load + unload a plain adapter, default slots", loads["plain default"], "ms"),
        ("  extended / default", loads["plain extended"] / loads["plain default"], "x"),
        ("generate, 1 plain adapter, extended slots", renders["one extended"], "ms"),
        ("generate, 1 plain adapter, default slots", renders["one default"], "ms"),
        ("  extended / default", renders["one extended"] / renders["one default"], "x"),
        (f"mixed batch of {PLAIN_ADAPTERS} plain adapters, extended slots",
         renders["mixed extended"], "ms"),
        (f"mixed batch of {PLAIN_ADAPTERS} plain adapters, default slots",
         renders["mixed default"], "ms"),
        ("  extended / default", renders["mixed extended"] / renders["mixed default"], "x"),
    ]  # fmt: skip
    report("slots", rows, args.out)


if __name__ == "__main__":
    main()
