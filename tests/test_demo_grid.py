"""The demo's grid: its labels stay readable (words apart)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tools.demo import TILE, grid


def gaps(image: Image.Image, min_width: int = 3) -> int:
    """Runs of at least ``min_width`` blank columns between the first and last inked ones."""
    ink = (np.asarray(image.convert("L")) < 128).any(axis=0)
    columns = np.flatnonzero(ink)
    inside = ink[columns[0] : columns[-1] + 1]
    runs, run = 0, 0
    for inked in inside:
        run = 0 if inked else run + 1
        runs += run == min_width
    return runs


def test_each_space_in_a_label_is_visible() -> None:
    white = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(white, format="PNG")
    label = "text enc = scale/2"
    canvas = grid([(label, [white.getvalue()])], ["unet scale 0.5"])
    row = canvas.crop((0, 28, canvas.width - TILE, 28 + TILE))  # the label column of row 0
    assert gaps(row) == label.count(" ")
