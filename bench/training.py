"""Training speed: our engine vs a minimal reference loop in the style of diffusers'
``train_dreambooth_lora.py`` (same model, data, rank, precision), each in its own process so
that peak RSS is its own.

    python -m bench.training [--model M] [--steps 60] [--out bench/results]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import report

VARIANTS = ("reference", "ours", "ours-cached", "pti")


def _images(count: int = 5):
    from PIL import Image

    from loraforge_core import toyworld

    return [
        Image.open(io.BytesIO(_png(s.image))).convert("RGB")
        for s in toyworld.samples(count, seed=5)
    ]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_loop(model: str, steps: int, rank: int) -> float:
    """UNet LoRA the way train_dreambooth_lora.py does it; returns steady-state steps/s."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from loraforge_core.targets import DEFAULT_UNET_TARGETS
    from trainer_service.training.data import to_tensor

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=list(DEFAULT_UNET_TARGETS),
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    resolution = vae.config.sample_size
    pixels = torch.stack([to_tensor(i, resolution) for i in _images()])
    ids = tokenizer(
        ["a photo of sks object"],
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    ends = []
    for _ in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (1,), generator=generator)]
        latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids)[0]
        prediction = unet(noisy, t, hidden, return_dict=False)[0]
        target = (
            scheduler.get_velocity(latents, noise, t)
            if scheduler.config.prediction_type == "v_prediction"
            else noise
        )
        loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ends.append(time.perf_counter())
    # The engine's own statistic (training/progress.py: the average since the first step,
    # after each step), summarised the same way: the median over the second half of the run.
    rates = [i / (ends[i] - ends[0]) for i in range(1, len(ends))]
    return steady_rate(rates)


def steady_rate(rates: list[float]) -> float:
    """The median of a run's reported rates over its second half."""
    second_half = sorted(rates[len(rates) // 2 :])
    return second_half[len(second_half) // 2]


def ours(model: str, steps: int, rank: int, *, cached: bool, pti: bool) -> dict[str, float]:
    from trainer_service.config import TrainingConfig
    from trainer_service.events import ListReporter, Progress
    from trainer_service.training.data import InstanceExample
    from trainer_service.training.trainer import RunPaths, Trainer

    config = TrainingConfig(
        pretrained_model_name_or_path=model, method="pti" if pti else "dreambooth_lora",
        max_train_steps_ti=steps if pti else 0, max_train_steps_tuning=steps,
        save_steps=10**6, lora_rank=rank, train_text_encoder=pti, cached_latents=cached,
        color_jitter=False, gradient_accumulation_steps=1, seed=0, device="cpu"
        if not torch.cuda.is_available() else "auto",
    )  # fmt: skip
    reporter = ListReporter()
    with tempfile.TemporaryDirectory() as tmp:
        examples = [InstanceExample(i, f"{n}.png") for n, i in enumerate(_images())]
        Trainer(config, examples, RunPaths(Path(tmp) / "c", Path(tmp) / "a"), reporter).run()
    rates: dict[str, float] = {}
    for phase in ("inversion", "tuning"):
        progress = [e for e in reporter.events if isinstance(e, Progress) and e.phase == phase]
        if progress:  # the engine's phase-average rate, median over the second half
            rates[phase] = steady_rate([e.steps_per_second for e in progress])
    return rates


def run_variant(variant: str, model: str, steps: int, rank: int) -> dict[str, float]:
    if variant == "reference":
        result = {"tuning": reference_loop(model, steps, rank)}
    else:
        result = ours(model, steps, rank, cached=variant != "ours", pti=variant == "pti")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mb"] = peak_kb / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant (internal)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    from loraforge_core.models import resolve_model

    model = resolve_model(args.model)
    if args.variant:
        print(json.dumps(run_variant(args.variant, model, args.steps, args.rank)))
        return
    # Each variant in its own process, the variants interleaved over rounds (this machine's
    # speed drifts by tens of percent over minutes); each figure is the median over rounds.
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, "-m", "bench.training", "--variant", variant, "--model",
                       model, "--steps", str(args.steps), "--rank", str(args.rank)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {
        variant: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for variant, rounds in runs.items()
    }
    ref = results["reference"]["tuning"]
    rows = [
        ("reference loop (diffusers dreambooth_lora style), steps/s", ref, "steps/s"),
        ("ours, DreamBooth-LoRA, VAE every step, steps/s", results["ours"]["tuning"], "steps/s"),
        ("  ours / reference", results["ours"]["tuning"] / ref, "x (target >= 0.95)"),
        ("ours, cached latents, steps/s", results["ours-cached"]["tuning"], "steps/s"),
        ("  cached / reference", results["ours-cached"]["tuning"] / ref, "x"),
        ("ours, PTI phase 1 (inversion), steps/s", results["pti"]["inversion"], "steps/s"),
        (
            "ours, PTI phase 2 (UNet + text encoder LoRA), steps/s",
            results["pti"]["tuning"],
            "steps/s",
        ),
    ]
    for variant in VARIANTS:
        rows.append((f"peak RSS, {variant}", results[variant]["peak_rss_mb"], "MiB"))
        if "peak_gpu_mb" in results[variant]:
            rows.append((f"peak GPU memory, {variant}", results[variant]["peak_gpu_mb"], "MiB"))
    report("training", rows, args.out)


if __name__ == "__main__":
    main()
