"""Shared test helpers: toy instance images and request builders."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw


class Clock:
    """Time that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shape_png(color: str = "red", size: int = 32, offset: int = 0) -> bytes:
    """A filled circle on white, as PNG bytes."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin = size // 8 + offset
    draw.ellipse([margin, margin, size - margin, size - margin], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_bundle(
    model: str, root, *, seed: int, token: str | None = None, text_encoder: bool = True
):
    from trainer_service.training.lora import random_lora_bundle

    return random_lora_bundle(model, root, seed=seed, token=token, text_encoder=text_encoder)


def write_model_index(folder: Path, class_name: str = "StableDiffusion3Pipeline") -> Path:
    """A model folder whose index names a pipeline class, and nothing else: by default SD3,
    a family loraforge runs in neither service (a refusal reads nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": class_name, "_diffusers_version": "0.36.0"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
