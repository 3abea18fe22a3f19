"""The denoising objective, shared by training and by evaluation.

A latent is noised at a random timestep (``add_noise``) and the model's prediction is compared
with what the scheduler's prediction type asks for: the noise (epsilon) or the velocity
(v-prediction, as zero-terminal-SNR models use). The draws come from a caller's generator, so
a run that replays a step draws the same noise and timesteps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def add_noise(
    scheduler: Any, latents: torch.Tensor, generator: torch.Generator, t_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, timesteps, noisy latents), timesteps drawn from the first ``t_fraction`` of the
    schedule."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t_max = max(1, int(scheduler.config.num_train_timesteps * t_fraction))
    timesteps = torch.randint(0, t_max, (latents.shape[0],), generator=generator).to(device)
    return noise, timesteps, scheduler.add_noise(latents, noise, timesteps)


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported for training")


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), one per sample.

    The weight of a timestep's loss is min(SNR, gamma) / SNR for a noise (epsilon) target: low-
    noise steps, whose SNR is large and whose loss is easy, stop dominating. A velocity target
    already carries a factor SNR + 1, so its weight is min(SNR, gamma) / (SNR + 1). Written as
    a ratio that is never 0 / 0: with zero terminal SNR the last timestep's SNR is 0.
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas).clamp(min=1e-12)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.where(snr > gamma, gamma / snr.clamp(min=1e-12), torch.ones_like(snr))
    if kind == "v_prediction":
        return torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    raise ValueError(f"prediction type {kind!r} is not supported for training")


def prediction_loss(
    prediction: torch.Tensor,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the prediction to its target, in float32; with ``weights`` (a
    loss mask, masks.loss_weights) both multiplied by them first, as lora_pti does; with
    ``snr_gamma``, each sample's error weighted by ``min_snr_weights``."""
    prediction = prediction.float()
    target = prediction_target(scheduler, latents, noise, timesteps).float()
    if weights is not None:
        prediction, target = prediction * weights, target * weights
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    per_sample = F.mse_loss(prediction, target, reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
