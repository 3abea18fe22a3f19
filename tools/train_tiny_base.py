"""Train the tiny base model on the toy world (CPU, about 12 minutes on 2 cores).

    python -m tools.train_tiny_base --out loraforge_core/assets/tiny-sd

Stage 1 trains the VAE (all colours and shapes, so concepts outside the base data can still
be encoded); stage 2 trains the UNet and the CLIP text encoder together on captioned images of
every base colour-shape pair but the held-out one, with zero-terminal-SNR v-prediction, caption
dropout (for classifier-free guidance) and EMA. The result is saved with ``save_pretrained``
and scored with the toy-world checker on held-out seeds.

``--family sdxl --init-from loraforge_core/assets/tiny-sd`` makes the toy-world SDXL: the SD
model's VAE as it is and its UNet's weights where the shapes agree (so no VAE stage), both
text encoders from scratch, the UNet conditioned as SDXL's is (both encoders' penultimate
hidden states, the second's pooled projection, size and crop ids), dropped captions as zeros
(the pipeline's ``force_zeros_for_empty_prompt``).

``--family flux --init-from loraforge_core/assets/tiny-sd`` makes the toy-world FLUX.1
(``TOY_FLUX``): the SD model's VAE with FLUX.1's latent shift and scale measured on the world,
the transformer and both text encoders from scratch on the family's flow-matching objective
(``train_flow_denoiser``); 7 minutes on 2 cores.

``--family zimage --init-from loraforge_core/assets/tiny-sd`` makes the toy-world Z-Image
(``TOY_Z_IMAGE``) the same way: the SD model's VAE, the transformer and the Qwen3 encoder from
scratch; 10% of the captions dropped to "" (Z-Image runs classifier-free guidance).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loraforge_core import families, toyworld
from loraforge_core.architectures import TINY
from loraforge_core.families import PromptEmbeddings, flux, zimage
from loraforge_core.models import TINY_ARCHITECTURES, build_pipeline

# The toy-world FLUX.1: the tiny FLUX's encoders, a transformer with two blocks of each kind
# and twice the width (the one-block tiny FLUX is for plumbing tests only).
TOY_FLUX = {
    **flux.TINY_FLUX,
    "transformer": {**flux.TINY_FLUX["transformer"], "num_layers": 2, "num_single_layers": 2,
                    "num_attention_heads": 4},
}  # fmt: skip
# The toy-world Z-Image: the tiny Z-Image's encoder, four main layers (the tiny one's two are
# for plumbing tests).
TOY_Z_IMAGE = {
    **zimage.TINY_Z_IMAGE,
    "transformer": {**zimage.TINY_Z_IMAGE["transformer"], "n_layers": 4},
}
# The flow-matching families this script trains: their tiny builder and toy architecture.
FLOW_TOYS = {"flux": (flux.build_tiny, TOY_FLUX), "zimage": (zimage.build_tiny, TOY_Z_IMAGE)}


def pixels_of(images) -> torch.Tensor:
    array = np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, seconds: float, steps: int, seed: int) -> dict:
    pairs = [(c, s) for c in toyworld.COLORS for s in toyworld.ALL_SHAPES]
    data = pixels_of([s.image for s in toyworld.samples(4096, seed, pairs)])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    started = time.monotonic()
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"vae step {step} loss {loss.item():.5f} {time.monotonic() - started:.0f}s")
        if time.monotonic() - started > seconds:
            break
    vae.eval()
    with torch.no_grad():
        test = data[:256]
        recon = vae.decode(vae.encode(test).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (test + 1) / 2).item()
        latents = torch.cat(
            [vae.encode(data[i : i + 256]).latent_dist.mean for i in range(0, 1024, 256)]
        )
    return {
        "vae_psnr_db": 10 * np.log10(1 / mse),
        "vae_steps": step + 1,
        "latent_std": latents.std().item(),
    }


def encoded_world(vae, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """6,144 captioned toy-world samples through the VAE: captions, latent means and stds."""
    samples = toyworld.samples(6144, seed + 1)
    with torch.no_grad():
        data = pixels_of([s.image for s in samples])
        dist = [vae.encode(data[i : i + 512]).latent_dist for i in range(0, len(data), 512)]
    return ([s.caption for s in samples], torch.cat([d.mean for d in dist]),
            torch.cat([d.std for d in dist]))  # fmt: skip


def fit(pipe, names: tuple[str, ...], batch_loss, seconds: float, steps: int, seed: int,
        lr: float) -> dict:  # fmt: skip
    """The pipeline's modules ``names`` trained together on ``batch_loss(generator)`` (AdamW,
    warm-up, clipping) until ``steps`` or ``seconds``; their EMA replaces them."""
    live = [getattr(pipe, name) for name in names]
    params = [p for module in live for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    emas = [copy.deepcopy(module) for module in live]
    generator = torch.Generator().manual_seed(seed)
    for module in live:
        module.train()
    started = time.monotonic()
    for step in range(steps):
        loss = batch_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, module in zip(emas, live, strict=True):
                for e, p in zip(ema.parameters(), module.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        if step % 100 == 0:
            elapsed = time.monotonic() - started
            print(f"{names[0]} step {step} loss {loss.item():.4f} {elapsed:.0f}s", flush=True)
        if time.monotonic() - started > seconds:
            break
    pipe.register_modules(**dict(zip(names, emas, strict=True)))
    for module in emas:
        module.eval()
    return {"denoiser_steps": step + 1, "denoiser_seconds": time.monotonic() - started, "lr": lr}


def train_denoiser(pipe, seconds: float, steps: int, seed: int, lr: float = 5e-4) -> dict:
    """A noise-prediction family's recipe (SD's, SDXL's) on the toy world: the UNet and every
    text encoder together, v-prediction on the zero-terminal-SNR schedule, the conditioning
    the family's pipeline computes (``encode_prompts``, ``denoiser_inputs``), 10% of the
    captions dropped as the pipeline drops them: "" for SD, zeros where it feeds zeros for an
    empty prompt (SDXL's ``force_zeros_for_empty_prompt``)."""
    from diffusers import DDPMScheduler

    family = families.of_pipeline(pipe)
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [getattr(pipe, name) for name in family.text_encoders]
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    captions, means, stds = encoded_world(vae, seed)
    scheduler = DDPMScheduler(
        **{
            k: v
            for k, v in TINY["scheduler"].items()
            if k not in ("set_alpha_to_one", "steps_offset")
        }
    )
    scaling = vae.config.scaling_factor
    side = toyworld.SIZE

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(means), (32,), generator=generator)
        latents = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        ) * scaling
        dropped = torch.rand(32, generator=generator) < 0.1
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        drops = zip(index.tolist(), dropped.tolist(), strict=True)
        prompts = ["" if d and not zeros else captions[i] for i, d in drops]
        embeddings = family.encode_prompts(tokenizers, text_encoders, prompts)
        if zeros:
            keep = (~dropped).float()
            embeddings = PromptEmbeddings(embeddings.hidden * keep[:, None, None],
                                          embeddings.pooled * keep[:, None])  # fmt: skip
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(index), dtype=torch.float32)
        conditioning = family.denoiser_inputs(embeddings, time_ids)
        return F.mse_loss(unet(noisy, t, **conditioning).sample, target)

    return fit(pipe, ("unet", *family.text_encoders), batch_loss, seconds, steps, seed, lr)


def train_flow_denoiser(pipe, seconds: float, steps: int, seed: int, lr: float = 5e-4) -> dict:
    """A flow-matching family's recipe (FLUX.1's) on the toy world: the denoiser and every
    text encoder together, rectified flow with logit-normal sigmas (the family's own
    objective and prediction, as LoRA training runs them), the guidance input drawn from 1 to
    6 (a toy base is not guidance-distilled: it learns to ignore it), no caption dropout (no
    negative branch). Set the VAE's shift and scale first (``calibrate_latents``)."""
    from loraforge_core.families.objectives import FlowMatching, ObjectiveOptions, objective_loss

    family = families.of_pipeline(pipe)
    denoiser, vae = getattr(pipe, family.denoiser), pipe.vae
    text_encoders = [getattr(pipe, name) for name in family.text_encoders]
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    captions, means, stds = encoded_world(vae, seed)
    shift, scaling = vae.config.shift_factor, vae.config.scaling_factor
    objective = FlowMatching(pipe.scheduler, ObjectiveOptions(weighting_scheme="logit_normal"))
    dropout = 0.1 if family.classifier_free(pipe, 5.0) else 0.0

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(means), (32,), generator=generator)
        dropped = torch.rand(len(index), generator=generator) < dropout
        latents = (
            means[index]
            + stds[index] * torch.randn(means[index].shape, generator=generator)
            - shift
        ) * scaling
        noised = objective.noised(latents, generator)
        drops = zip(index.tolist(), dropped.tolist(), strict=True)
        prompts = ["" if d else captions[i] for i, d in drops]
        embeddings = family.encode_prompts(tokenizers, text_encoders, prompts)
        guidance = 1 + 5 * torch.rand((), generator=generator).item()
        prediction = family.predict(denoiser, noised, embeddings, dtype=torch.float32,
                                    guidance=guidance)  # fmt: skip
        return objective_loss(prediction, noised)

    names = (family.denoiser, *family.text_encoders)
    return fit(pipe, names, batch_loss, seconds, steps, seed, lr) | {
        "vae_shift_factor": shift, "vae_scaling_factor": scaling,
    }  # fmt: skip


def calibrate_latents(vae, seed: int) -> None:
    """FLUX.1's latent normalisation, (latents - shift_factor) * scaling_factor, measured on
    the toy world: zero mean, unit deviation."""
    data = pixels_of([s.image for s in toyworld.samples(1024, seed)])
    with torch.no_grad():
        means = torch.cat([vae.encode(data[i : i + 256]).latent_dist.mean
                           for i in range(0, len(data), 256)])  # fmt: skip
    vae.register_to_config(shift_factor=means.mean().item(), scaling_factor=1 / means.std().item())


def warm_start(pipe, source: Path) -> None:
    """The VAE of a model this script saved, and its UNet's weights wherever the shapes agree
    (a 1x1 convolution's as a linear layer's) when both have a UNet."""
    from diffusers import DiffusionPipeline

    donor = DiffusionPipeline.from_pretrained(source)
    pipe.vae.load_state_dict(donor.vae.state_dict())
    if getattr(pipe, "unet", None) is None:
        print(f"warm start from {source}: VAE")
        return
    own = pipe.unet.state_dict()
    copied = 0
    for key, value in donor.unet.state_dict().items():
        if key in own and own[key].numel() == value.numel():
            own[key] = value.reshape(own[key].shape)
            copied += 1
    pipe.unet.load_state_dict(own)
    print(f"warm start from {source}: VAE and {copied} of {len(own)} UNet tensors")


def prompt_accuracy(pipe, seeds: range, guidance: float = 5.0, steps: int = 20) -> dict:
    """Fraction of images whose checker reading matches the prompt, per pair and overall."""
    pairs = [(c, s) for c in toyworld.BASE_COLORS for s in toyworld.BASE_SHAPES]
    hits: dict[str, list[bool]] = {}
    for seed in seeds:
        color, shape = pairs[seed % len(pairs)]
        image = pipe(
            toyworld.caption(color, shape),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            height=toyworld.SIZE,
            width=toyworld.SIZE,
            **families.of_pipeline(pipe).call_options(pipe),
        ).images[0]
        hits.setdefault(f"{color} {shape}", []).append(toyworld.check(image).matches(color, shape))
    total = [h for v in hits.values() for h in v]
    held_out = " ".join(toyworld.HELD_OUT)
    seen = [h for pair, v in hits.items() if pair != held_out for h in v]
    return {
        "accuracy": sum(total) / len(total),
        "seen_pairs_accuracy": sum(seen) / len(seen),
        "per_pair": {k: sum(v) / len(v) for k, v in hits.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("loraforge_core/assets/tiny-sd"))
    parser.add_argument("--vae-seconds", type=float, default=300)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-seconds", type=float, default=480)
    parser.add_argument("--unet-steps", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume",
        type=Path,
        help="continue the denoiser of a model this script saved (no VAE stage)",
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--family", choices=sorted([*TINY_ARCHITECTURES, *FLOW_TOYS]),
                        default="sd")  # fmt: skip
    parser.add_argument(
        "--init-from", type=Path, help="a model this script saved: its VAE and UNet to start from"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    history: list = []
    if args.resume:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.resume)
        previous = json.loads((args.resume / "loraforge_model.json").read_text())
        history = [*previous.get("history", []), previous["report"]]
        report: dict = {}
    elif args.family in FLOW_TOYS:
        if not args.init_from:
            parser.error(f"--family {args.family} needs --init-from (the VAE of a model this "
                         "script saved)")  # fmt: skip
        build, architecture = FLOW_TOYS[args.family]
        pipe = build(args.seed, architecture)
        warm_start(pipe, args.init_from)
        calibrate_latents(pipe.vae, args.seed)
        report = {"init_from": str(args.init_from)}
    elif args.init_from:
        pipe = build_pipeline(TINY_ARCHITECTURES[args.family], seed=args.seed)
        warm_start(pipe, args.init_from)
        report = {"init_from": str(args.init_from)}
    else:
        pipe = build_pipeline(TINY_ARCHITECTURES[args.family], seed=args.seed)
        report = train_vae(pipe.vae, args.vae_seconds, args.vae_steps, args.seed)
        pipe.vae.register_to_config(scaling_factor=1.0 / report["latent_std"])
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    train = train_flow_denoiser if args.family in FLOW_TOYS else train_denoiser
    report |= train(pipe, args.unet_seconds, args.unet_steps, args.seed + len(history), lr=args.lr)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    report |= {"held_out_seeds": prompt_accuracy(pipe, range(10_000, 10_064))}
    print(json.dumps(report, indent=2))
    pipe.save_pretrained(args.out, safe_serialization=True)
    (args.out / "loraforge_model.json").write_text(json.dumps(
        {"name": "loraforge/tiny" + ("" if args.family == "sd" else f"-{args.family}"),
         "trained_on": "toy world", "report": report,
         "history": history}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
