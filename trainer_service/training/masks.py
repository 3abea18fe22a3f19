"""Masks in training: loss masks (what to learn), face masks, and inpainting's random holes.

Loss masks are lora_pti's masked training. A mask (white = the subject) is mapped from [0, 1]
to [0.5, 1.5], resized to the latent grid, raised to ``mask_temperature`` after adding 0.01 and
divided by its maximum; the prediction and its target are both multiplied by it, so each
latent pixel's squared error is weighted by the weight's square (background 0.11 of the
subject at temperature 1). The maximum is each sample's own, so a sample's weighting does not
depend on its batchmates (lora_pti divides by the batch's; the same at batch size 1).

Face masks: the seed used MediaPipe, whose current wheel ships no detector model and fetches one
at run time. OpenCV 4's wheel ships its Haar cascades, which run offline; OpenCV 5 dropped
them, hence ``opencv-python-headless<5`` (the ``faces`` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

FACE_CASCADE = "haarcascade_frontalface_default.xml"
NO_DETECTOR = (
    "use_face_segmentation_condition needs OpenCV 4 on the trainer (pip install "
    "'loraforge[faces]'); or send each image's mask in InstanceImage.mask (white = the face)"
)


def loss_weights(masks: torch.Tensor, size: tuple[int, int], temperature: float) -> torch.Tensor:
    """Per-sample loss weights on a latent grid of ``size``, of masks ``[B, 1, H, W]`` in [0, 1]."""
    weights = F.interpolate(masks.float() + 0.5, size=size, mode="nearest")
    weights = (weights + 0.01).pow(temperature)
    return weights / weights.amax(dim=(1, 2, 3), keepdim=True)


def face_detector_problem() -> str | None:
    """Why this process cannot detect faces, or None."""
    try:
        import cv2
    except ImportError:
        return NO_DETECTOR
    if not hasattr(cv2, "CascadeClassifier"):
        return NO_DETECTOR
    return None


def face_mask(image: Image.Image) -> Image.Image | None:
    """White boxes over the faces OpenCV's frontal-face cascade finds; None where none is."""
    import cv2
    import numpy as np

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + FACE_CASCADE)
    gray = np.asarray(image.convert("L"))
    smallest = max(16, min(image.size) // 20)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(smallest, smallest))  # fmt: skip
    if len(faces) == 0:
        return None
    mask = np.zeros(gray.shape, dtype=np.uint8)
    for x, y, width, height in faces:
        mask[y : y + height, x : x + width] = 255
    return Image.fromarray(mask, mode="L")


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


def with_face_masks(examples: list[Any], warn: Callable[[str], None]) -> list[Any]:
    """The instance examples, each one sent without a mask given its faces' mask (``warn``
    says which images showed no face: they train unmasked)."""
    out = []
    for i, example in enumerate(examples):
        if example.mask is None:
            mask = face_mask(example.image)
            if mask is None:
                warn(f"no face found in image {i} ({example.filename or 'unnamed'}): unmasked")
            example = dataclasses.replace(example, mask=mask)
        out.append(example)
    return out
