"""Measures of what a model has learned, on fixed noise and timesteps (comparable runs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image

from trainer_service.training.data import to_tensor


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
    noise = torch.randn(latents.shape, generator=generator).to(pipe.device)
    total = pipe.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, total, (samples,), generator=generator).to(pipe.device)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    ids = pipe.tokenizer(
        [prompt] * samples,
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(pipe.device)
    hidden = pipe.text_encoder(ids)[0]
    prediction = pipe.unet(noisy, timesteps, hidden).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float()).item()
