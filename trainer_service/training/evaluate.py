"""Measures of what a model has learned, on fixed noise and timesteps (comparable runs)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from loraforge_core import families
from loraforge_core.families.objectives import ObjectiveOptions, objective_loss
from trainer_service.training.data import normalized, size_and_crop, to_tensor


@torch.no_grad()
def denoising_loss(
    pipe: Any,
    image: Image.Image,
    prompt: str,
    *,
    samples: int = 32,
    seed: int = 0,
) -> float:
    """Mean training loss of ``pipe`` on one image and prompt, over ``samples`` fixed draws.

    The same seed gives the same noise and timesteps, so two pipelines (base, base + LoRA)
    are compared on identical problems. The objective is the family's (its scheduler's
    prediction type for noise prediction).
    """
    import diffusers

    family = families.of_pipeline(pipe)
    resolution = int(pipe.vae.config.sample_size)
    pixels = to_tensor(image, resolution).unsqueeze(0).to(pipe.device)
    latents = normalized(pipe.vae, pipe.vae.encode(pixels).latent_dist.mean)
    latents = latents.repeat(samples, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    scheduler = getattr(diffusers, family.training_scheduler).from_config(pipe.scheduler.config)
    noised = family.objective(scheduler, ObjectiveOptions()).noised(latents, generator)
    embeddings = family.encode_prompts(
        [getattr(pipe, name) for name in family.tokenizers],
        [getattr(pipe, name) for name in family.text_encoders], [prompt] * samples, pipe.device,
    )  # fmt: skip
    side = (resolution, resolution)
    time_ids = size_and_crop(side, side).repeat(samples, 1).to(pipe.device)
    denoiser = getattr(pipe, family.denoiser)
    prediction = family.predict(denoiser, noised, embeddings, dtype=denoiser.dtype,
                                time_ids=time_ids)  # fmt: skip
    return objective_loss(prediction, noised).item()
