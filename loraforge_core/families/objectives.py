"""Training objectives, shared by training and by evaluation; a family says which it trains
with (``Family.objective``).

- **Noise prediction** on a DDPM schedule (SD 1.x/2.x, SDXL): a latent is noised at a random
  timestep (``add_noise``) and the prediction is compared with what the scheduler's
  prediction type asks for: the noise (epsilon) or the velocity (v-prediction, as
  zero-terminal-SNR models use); optionally Min-SNR-gamma weighted.
- **Flow matching** (FLUX.1 and the DiT families): ``x_s = (1 - s) x + s e`` at a sigma drawn
  from a density (uniform, logit-normal or "mode", as diffusers' training utilities draw
  them), the target is the velocity ``e - x``, optionally weighted per sigma (``sigma_sqrt``,
  ``cosmap``), as diffusers' ``train_dreambooth_lora_flux.py`` trains.

The draws come from a caller's generator, so a run that replays a step draws the same noise
and timesteps. ``t_fraction`` < 1 keeps the draws in the least noisy part of the schedule
(textual inversion's first 80% of timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the trainer server validates options without torch
    import torch

# diffusers' weighting schemes: how sigmas are drawn, and how each sample's loss is weighted.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class ObjectiveOptions:
    """What a training run sets about its objective (each family reads what applies)."""

    snr_gamma: float | None = None  # noise prediction: Min-SNR-gamma; None: unweighted
    weighting_scheme: str = "none"  # flow matching: WEIGHTING_SCHEMES
    logit_mean: float = 0.0  # logit_normal's
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode's


@dataclass
class Noised:
    """One noised micro-batch: the denoiser's input and what its output is compared with."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor  # the scheduler's timesteps (flow matching: sigma * 1000)
    weighting: torch.Tensor | None = None  # one loss weight per sample; None: all 1


class NoisePrediction:
    """Epsilon or v prediction on the DDPM schedule ``scheduler`` (its prediction type)."""

    def __init__(self, scheduler: Any, options: ObjectiveOptions = ObjectiveOptions()) -> None:
        self.scheduler = scheduler
        self.snr_gamma = options.snr_gamma

    def noised(
        self, latents: torch.Tensor, generator: torch.Generator, t_fraction: float = 1.0
    ) -> Noised:
        noise, timesteps, noisy = add_noise(self.scheduler, latents, generator, t_fraction)
        target = prediction_target(self.scheduler, latents, noise, timesteps)
        weighting = (None if self.snr_gamma is None
                     else min_snr_weights(self.scheduler, timesteps, self.snr_gamma))  # fmt: skip
        return Noised(noisy, target, timesteps, weighting)


class FlowMatching:
    """Rectified flow on ``scheduler``'s sigmas (a ``FlowMatchEulerDiscreteScheduler``)."""

    def __init__(self, scheduler: Any, options: ObjectiveOptions = ObjectiveOptions()) -> None:
        refused = self.refusal(options)
        if refused is not None:
            raise ValueError(f"{refused[0]}: {refused[1]}")
        self.scheduler = scheduler
        self.options = options

    @staticmethod
    def refusal(options: ObjectiveOptions) -> tuple[str, str] | None:
        """(option, why) for an option flow matching cannot honour; None if all can be."""
        if options.snr_gamma is not None:
            return "snr_gamma", (
                "weights noise prediction on a DDPM schedule; this model trains with flow "
                "matching: set weighting_scheme (sigma_sqrt, cosmap, logit_normal, mode) instead"
            )
        if options.weighting_scheme not in WEIGHTING_SCHEMES:
            return "weighting_scheme", f"must be one of {', '.join(WEIGHTING_SCHEMES)}"
        return None

    def noised(
        self, latents: torch.Tensor, generator: torch.Generator, t_fraction: float = 1.0
    ) -> Noised:
        import torch
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        o = self.options
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=o.weighting_scheme, batch_size=latents.shape[0],
            logit_mean=o.logit_mean, logit_std=o.logit_std, mode_scale=o.mode_scale,
            generator=generator,
        )  # fmt: skip
        u = (1 - t_fraction) + t_fraction * u  # the schedule runs from the noisiest sigma
        count = int(self.scheduler.config.num_train_timesteps)
        indices = (u * count).long().clamp(0, count - 1)
        sigmas = self.scheduler.sigmas[indices].to(device, latents.dtype)
        shaped = sigmas.view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - shaped) * latents + shaped * noise
        weighting = compute_loss_weighting_for_sd3(o.weighting_scheme, sigmas)
        return Noised(noisy, noise - latents, self.scheduler.timesteps[indices].to(device),
                      weighting.float())  # fmt: skip


def objective_loss(
    prediction: torch.Tensor, noised: Noised, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error of the prediction to its target, in float32; with ``weights`` (a
    loss mask, masks.loss_weights) both multiplied by them first, as lora_pti does; each
    sample's error times its weighting."""
    import torch.nn.functional as F

    prediction, target = prediction.float(), noised.target.float()
    if weights is not None:
        prediction, target = prediction * weights, target * weights
    if noised.weighting is None:
        return F.mse_loss(prediction, target)
    per_sample = F.mse_loss(prediction, target, reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    return (per_sample * noised.weighting.to(per_sample)).mean()


def add_noise(
    scheduler: Any, latents: torch.Tensor, generator: torch.Generator, t_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, timesteps, noisy latents), timesteps drawn from the first ``t_fraction`` of the
    schedule."""
    device = latents.device
    import torch

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
    import torch

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
    """``objective_loss`` of a noise prediction at these draws; with ``snr_gamma``, each
    sample's error weighted by ``min_snr_weights``."""
    target = prediction_target(scheduler, latents, noise, timesteps)
    weighting = None if snr_gamma is None else min_snr_weights(scheduler, timesteps, snr_gamma)
    return objective_loss(prediction, Noised(latents, target, timesteps, weighting), weights)
