"""A toy world the tiny base model learns to draw: one coloured shape on white, 32x32 pixels.

Captions read "a red circle". ``check`` reads colour and shape back from pixels (hue of the
largest non-white region; best-matching shape template), so what a model draws can be scored
against its prompt without a human, for the base model and for a LoRA's concept alike.
"""

from __future__ import annotations

import colorsys
import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 40, 180),
}
BASE_COLORS = ("red", "green", "blue")
BASE_SHAPES = ("circle", "square", "triangle")
ALL_SHAPES = ("circle", "square", "triangle", "star")
# Never shown to the base model: it must compose it from the words alone.
HELD_OUT = ("blue", "triangle")


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    color: str
    shape: str

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape)


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list:
    if shape == "square":
        corners = 4
        offset = math.pi / 4 + angle
        return [
            (
                cx + radius * math.cos(offset + k * math.pi / 2),
                cy + radius * math.sin(offset + k * math.pi / 2),
            )
            for k in range(corners)
        ]
    if shape == "triangle":
        return [
            (
                cx + radius * math.cos(-math.pi / 2 + angle + k * 2 * math.pi / 3),
                cy + radius * 1.1 * math.sin(-math.pi / 2 + angle + k * 2 * math.pi / 3) + 1,
            )
            for k in range(3)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius * (1.0 if k % 2 == 0 else 0.45)
            a = -math.pi / 2 + angle + k * math.pi / 5
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(
    color: str, shape: str, rng: random.Random | None = None, *, size: int = SIZE
) -> Image.Image:
    """One antialiased shape on white, with a little jitter in place, size and angle."""
    rng = rng or random.Random(0)
    scale = SUPERSAMPLE * size / SIZE
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(8.5, 11.5) * scale
    cx = big / 2 + rng.uniform(-2.5, 2.5) * scale
    cy = big / 2 + rng.uniform(-2.5, 2.5) * scale
    angle = 0.0 if shape == "square" else rng.uniform(-0.15, 0.15)
    fill = tuple(int(np.clip(c + rng.uniform(-15, 15), 0, 255)) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def base_pairs() -> list[tuple[str, str]]:
    """Colour-shape pairs the base model trains on (all but the held-out one)."""
    return [(c, s) for c in BASE_COLORS for s in BASE_SHAPES if (c, s) != HELD_OUT]


def samples(count: int, seed: int, pairs: list[tuple[str, str]] | None = None) -> list[Sample]:
    rng = random.Random(seed)
    pairs = pairs or base_pairs()
    out = []
    for _ in range(count):
        color, shape = rng.choice(pairs)
        out.append(Sample(render(color, shape, rng), color, shape))
    return out


# ---------------------------------------------------------------------------------- checker
@dataclass(frozen=True)
class Reading:
    color: str | None
    shape: str | None
    area: int

    def matches(self, color: str | None = None, shape: str | None = None) -> bool:
        return (color is None or self.color == color) and (shape is None or self.shape == shape)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        region, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _hue_name(rgb: np.ndarray) -> str | None:
    h, s, v = colorsys.rgb_to_hsv(*(rgb / 255.0))
    if s < 0.3 or v < 0.2:
        return None
    hue = h * 360
    for name, (low, high) in {
        "red": (-20, 20),
        "yellow": (35, 75),
        "green": (75, 170),
        "blue": (190, 255),
        "purple": (260, 320),
    }.items():
        if low <= hue <= high or low <= hue - 360 <= high:
            return name
    return None


def _template(shape: str, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The shape's mask fitted to a region's bounding box."""
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    big = SIZE * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    box = [
        left * SUPERSAMPLE,
        top * SUPERSAMPLE,
        (right + 1) * SUPERSAMPLE,
        (bottom + 1) * SUPERSAMPLE,
    ]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        cx = (box[0] + box[2]) / 2
        points = np.array(_polygon(shape, 0, 0, 1, 0))
        # Stretch the unit polygon onto the box.
        span_x = points[:, 0].max() - points[:, 0].min()
        span_y = points[:, 1].max() - points[:, 1].min()
        px = cx + (points[:, 0] - points[:, 0].mean()) * (box[2] - box[0]) / span_x
        py = box[1] + (points[:, 1] - points[:, 1].min()) * (box[3] - box[1]) / span_y
        draw.polygon(list(zip(px, py, strict=True)), fill=255)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX)) > 127


def check(image: Image.Image, shapes: tuple[str, ...] = ALL_SHAPES) -> Reading:
    """Colour and shape of the largest non-white region of a 32x32 image."""
    pixels = np.asarray(
        image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32
    )
    distance = np.abs(pixels - 255).max(axis=-1)
    region = _largest_region(distance > 70)
    area = int(region.sum())
    if area < 12 or area > 0.6 * SIZE * SIZE:  # nothing drawn, or no shape on white
        return Reading(None, None, area)
    color = _hue_name(pixels[region].mean(axis=0))
    ys, xs = np.nonzero(region)
    best, best_iou = None, 0.0
    for shape in shapes:
        template = _template(shape, ys, xs)
        iou = (template & region).sum() / max((template | region).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(color, best if best_iou > 0.55 else None, area)
