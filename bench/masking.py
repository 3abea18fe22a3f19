"""Masked training on busy backgrounds: subject fidelity, and what leaks into the background.

PTI with the demo's recipe (fewer tuning steps) on the concept on green and blue blocks
(``fidelity.busy_concept_examples``), without masks and with them at two temperatures. Each
adapter renders the concept's probes at scale 0 (the base model) and 1. The background leak is
the fraction of pixels in the backgrounds' colours (green or blue hues) outside the subject
(the checker's largest region); stray ink counts any colour outside the subject (fragments of
the subject, smudges).

    python -m bench.masking [--steps 1200] [--temperatures 1 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import report

BACKGROUND_HUES = ("green", "blue")  # fidelity.busy_concept_examples' blocks


def leaks(image) -> tuple[float, float]:
    """(background-colour leak, stray ink) of one render, as fractions of its pixels."""
    from loraforge_core import toyworld

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    ink = np.abs(pixels - 255).max(-1)
    outside = (ink > 40) & ~toyworld._largest_region(ink > 70)
    hues = [toyworld._hue_name(p) for p in pixels.reshape(-1, 3)]
    background = np.array([h in BACKGROUND_HUES for h in hues]).reshape(ink.shape)
    return float((outside & background).mean()), float(outside.mean())


def measure(temperature: float | None, steps: int, root: Path) -> dict[str, float]:
    import torch

    from loraforge_core.bundle import read_bundle
    from loraforge_core.fidelity import (
        CONCEPT_COLOR,
        CONCEPT_TRAINING,
        GUIDANCE,
        Concept,
        busy_concept_examples,
        score,
    )
    from loraforge_core.models import load_pipeline
    from trainer_service.config import TrainingConfig
    from trainer_service.training.data import InstanceExample
    from trainer_service.training.engine import RunPaths, Trainer

    options = {**CONCEPT_TRAINING, "max_train_steps_tuning": steps,
               "mask_temperature": temperature or 1.0}  # fmt: skip
    config = TrainingConfig(pretrained_model_name_or_path="", device="cpu", **options)
    examples = [InstanceExample(image, name, caption, mask if temperature else None)
                for name, image, caption, mask in busy_concept_examples()]  # fmt: skip
    started = time.perf_counter()
    bundle = Trainer(config, examples, RunPaths(root / "c", root / "a")).run()
    seconds = time.perf_counter() - started
    pipe = load_pipeline("")
    loaded = read_bundle(bundle.path)
    pipe.load_lora_weights(loaded.lora_path, adapter_name="b")
    embeddings = loaded.embeddings()
    pipe.load_textual_inversion(list(embeddings.values()), token=list(embeddings))
    found: dict[float, list[tuple[float, float]]] = {0.0: [], 1.0: []}

    def render(prompt: str, scale: float, seed: int):
        pipe.set_adapters(["b"], [scale])
        image = pipe(prompt, num_inference_steps=20, guidance_scale=GUIDANCE,
                     generator=torch.Generator().manual_seed(seed)).images[0]  # fmt: skip
        found[scale].append(leaks(image))
        return image

    rows = score(render, Concept(CONCEPT_COLOR), "".join(embeddings), scales=(0.0, 1.0))
    return {
        "seconds": seconds, "fidelity": rows[1].subject_fidelity,
        "leak base": float(np.mean([b for b, _ in found[0.0]])),
        "leak": float(np.mean([b for b, _ in found[1.0]])),
        "stray base": float(np.mean([s for _, s in found[0.0]])),
        "stray": float(np.mean([s for _, s in found[1.0]])),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    variants = {"unmasked": None} | {f"masked, temperature {t:g}": t for t in args.temperatures}
    rows = []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, temperature) in enumerate(variants.items()):
            results[name] = measure(temperature, args.steps, Path(tmp) / str(i))
            print(name, results[name], flush=True)  # minutes apart: show each as it ends
    base = results["unmasked"]
    for name, r in results.items():
        rows += [
            (f"{name}: subject fidelity at scale 1", r["fidelity"], "fraction"),
            (f"{name}: background-colour leak at scale 1", r["leak"], "fraction of pixels"),
            (f"{name}: leak vs unmasked", r["leak"] / max(base["leak"], 1e-9), "x"),
            (f"{name}: stray ink at scale 1", r["stray"], "fraction of pixels"),
            (f"{name}: training time", r["seconds"], "s"),
        ]
    rows += [
        ("base model (scale 0): background-colour leak", base["leak base"], "fraction of pixels"),
        ("base model (scale 0): stray ink", base["stray base"], "fraction of pixels"),
    ]
    report("masking", rows, args.out)


if __name__ == "__main__":
    main()
