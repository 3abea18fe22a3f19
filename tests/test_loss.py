"""The denoising loss's min-SNR-gamma weighting (loraforge_core/families/objectives.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from loraforge_core.families.objectives import min_snr_weights, prediction_loss

TIMESTEPS = torch.tensor([0, 10, 250, 500, 999])


def snr_from_betas(scheduler) -> np.ndarray:
    """SNR(t) = alpha_bar / (1 - alpha_bar), from the betas, independently of the scheduler."""
    alpha_bar = np.cumprod(1 - scheduler.betas.double().numpy())
    return alpha_bar / (1 - alpha_bar)


def test_noise_targets_weigh_min_snr_over_snr():
    scheduler = DDPMScheduler(prediction_type="epsilon")
    snr = snr_from_betas(scheduler)[TIMESTEPS.numpy()]
    weights = min_snr_weights(scheduler, TIMESTEPS, gamma=5.0).double().numpy()
    # float32 alphas: 1 - alpha_bar near t=0 keeps 4 digits
    np.testing.assert_allclose(weights, np.minimum(snr, 5.0) / snr, rtol=1e-3)
    assert weights[0] < 0.01 and weights[-1] == 1.0  # clean steps weigh little, noisy ones 1


def test_velocity_targets_with_zero_terminal_snr_stay_finite(tiny_model: Path):
    config = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] and config["prediction_type"] == "v_prediction"
    scheduler = DDPMScheduler.from_config(config)
    snr = snr_from_betas(scheduler)[TIMESTEPS.numpy()]
    assert snr[-1] < 1e-6  # the last timestep is pure noise
    weights = min_snr_weights(scheduler, TIMESTEPS, gamma=5.0).double().numpy()
    assert np.isfinite(weights).all()
    np.testing.assert_allclose(weights, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_weights_scale_each_samples_error(kind: str):
    scheduler = DDPMScheduler(prediction_type=kind)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, len(TIMESTEPS), 4, 8, 8, generator=generator)
    prediction = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator)
    plain = prediction_loss(prediction, scheduler, latents, noise, TIMESTEPS)
    weighted = prediction_loss(prediction, scheduler, latents, noise, TIMESTEPS, snr_gamma=5.0)
    per_sample = [
        prediction_loss(prediction[i : i + 1], scheduler, latents[i : i + 1], noise[i : i + 1],
                        TIMESTEPS[i : i + 1])
        for i in range(len(TIMESTEPS))
    ]  # fmt: skip
    weights = min_snr_weights(scheduler, TIMESTEPS, 5.0)
    expected = (torch.stack(per_sample) * weights).mean()
    torch.testing.assert_close(weighted, expected)
    assert not torch.isclose(weighted, plain)
