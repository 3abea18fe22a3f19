"""Masks in training: loss masks (what to learn) and inpainting's random holes (face masks, a
source of loss masks, are in faces.py).

Loss masks are lora_pti's masked training. A mask (white = the subject) is mapped from [0, 1]
to [0.5, 1.5], resized to the latent grid, raised to ``mask_temperature`` after adding 0.01 and
divided by its maximum; the prediction and its target are both multiplied by it, so each
latent pixel's squared error is weighted by the weight's square (background 0.11 of the
subject at temperature 1). The maximum is each sample's own, so a sample's weighting does not
depend on its batchmates (lora_pti divides by the batch's; the same at batch size 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_weights(masks: torch.Tensor, size: tuple[int, int], temperature: float) -> torch.Tensor:
    """Per-sample loss weights on a latent grid of ``size``, of masks ``[B, 1, H, W]`` in [0, 1]."""
    weights = F.interpolate(masks.float() + 0.5, size=size, mode="nearest")
    weights = (weights + 0.01).pow(temperature)
    return weights / weights.amax(dim=(1, 2, 3), keepdim=True)


def random_holes(
    height: int, width: int, generator: torch.Generator, full_chance: float = 0.25
) -> torch.Tensor:
    """lora_pti's inpainting mask ``[1, H, W]``: 8-32 rectangles of 1/32 to 1/4 of the side
    (16-128 px at 512), or, a quarter of the time, everything."""

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    mask = torch.zeros(1, height, width)
    if float(torch.rand(1, generator=generator)) < full_chance:
        return mask.fill_(1.0)
    for _ in range(draw(8, 32)):
        hole_h = draw(max(1, height // 32), max(1, height // 4))
        hole_w = draw(max(1, width // 32), max(1, width // 4))
        top, left = draw(0, height - hole_h), draw(0, width - hole_w)
        mask[:, top : top + hole_h, left : left + hole_w] = 1.0
    return mask
