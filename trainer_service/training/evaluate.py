"""Measures of what a model has learned, on fixed noise and timesteps (comparable runs)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from loraforge_core import families
from trainer_service.training.data import size_and_crop, to_tensor
from trainer_service.training.loss import add_noise, prediction_loss


@torch.no_grad()
def denoising_loss(
    pipe: StableDiffusionPipeline,
    image: Image.Image,
    prompt: str,
    *,
    samples: int = 32,
    seed: int = 0,
) -> float:
    """Mean denoising loss of ``pipe`` on one image and prompt, over ``samples`` fixed draws.

    The same seed gives the same noise and timesteps, so two pipelines (base, base + LoRA)
    are compared on identical problems. The target follows the scheduler's prediction type.
    """
    resolution = int(pipe.vae.config.sample_size)
    pixels = to_tensor(image, resolution).unsqueeze(0).to(pipe.device)
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    latents = latents.repeat(samples, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise, timesteps, noisy = add_noise(scheduler, latents, generator)
    family = families.of_pipeline(pipe)
    embeddings = family.encode_prompts(
        [getattr(pipe, name) for name in family.tokenizers],
        [getattr(pipe, name) for name in family.text_encoders], [prompt] * samples, pipe.device,
    )  # fmt: skip
    side = (resolution, resolution)
    time_ids = size_and_crop(side, side).repeat(samples, 1).to(pipe.device)
    prediction = pipe.unet(noisy, timesteps, **family.denoiser_inputs(embeddings, time_ids)).sample
    return prediction_loss(prediction, scheduler, latents, noise, timesteps).item()
