"""Instance images, captions and augmentation (as in lora_pti's PivotalTuningDatasetCapation)."""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from trainer_service.config import TrainingConfig

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)  # fmt: skip
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class InstanceExample:
    """One decoded instance image with its optional caption and file name."""

    image: Image.Image
    filename: str = ""
    caption: str = ""


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes to RGB; refuses decompression bombs. Raises ValueError."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format not in ("PNG", "JPEG", "WEBP"):
                raise ValueError(f"format {probe.format} is not PNG, JPEG or WebP")
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{width}x{height} is larger than {MAX_IMAGE_PIXELS} pixels")
            probe.load()
            return ImageOps.exif_transpose(probe).convert("RGB")
    except ValueError:
        raise
    except Exception as err:  # untrusted bytes: any decoder failure is the input's fault
        raise ValueError(f"cannot decode image: {err}") from err


def caption_from_filename(filename: str) -> str:
    """``a_red_circle (2).png`` -> ``a red circle``."""
    stem = Path(filename).stem
    stem = re.sub(r"\(\d+\)$", "", stem).strip()
    return re.sub(r"[_\-]+", " ", stem).strip()


def placeholder_text(tokens: list[str]) -> str:
    return "".join(tokens)


def caption_for(
    example: InstanceExample,
    template: str,
    tokens: list[str],
    rng: random.Random,
    fallback: str = "",
    token_at_data: str = "",
) -> str:
    """A training caption: a random template with the tokens, or the image's own caption.

    In own captions, ``{}`` or ``<s>`` stand for the placeholder tokens, and so does DATA
    where ``token_at_data`` is "DATA|TOKENS" (then TOKENS replace it, as lora_pti does).
    """
    text = placeholder_text(tokens)
    if template in TEMPLATES:
        return rng.choice(TEMPLATES[template]).format(text)
    caption = example.caption or caption_from_filename(example.filename) or fallback
    if token_at_data:
        data, _, replacement = token_at_data.partition("|")
        caption = caption.replace(data, replacement)
    return caption.replace("{}", text).replace("<s>", text)


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to [-1, 1], CHW."""
    image = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def color_jitter(
    pixels: torch.Tensor, generator: torch.Generator, strength: float = 0.1
) -> torch.Tensor:
    """Brightness and contrast jitter of +-strength (torchvision's ColorJitter(0.1, 0.1))."""
    factors = 1 + (torch.rand(2, generator=generator) * 2 - 1) * strength
    image = (pixels + 1) / 2 * factors[0]
    mean = image.mean()
    image = (image - mean) * factors[1] + mean
    return image.clamp(0, 1) * 2 - 1


class TrainingData:
    """The instance images as training batches: pixels per image (and its mirror), with
    cached latents their VAE posteriors, and for prior preservation the class images.

    ``batch`` draws everything from the step's generator, so a step replays exactly."""

    def __init__(
        self, config: TrainingConfig, examples: list[InstanceExample], vae: Any,
        resolution: int, device: torch.device, class_pixels: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.examples = examples
        self.vae = vae
        self.device = device
        pixels = [to_tensor(e.image, resolution) for e in examples]
        if config.random_flip:
            pixels += [p.flip(-1) for p in pixels]
        self.pixels = torch.stack(pixels)
        self.latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.cached_latents:
            with torch.no_grad():
                dist = vae.encode(self.pixels.to(device)).latent_dist
            self.latent_cache = (dist.mean, dist.std)
        self.class_pixels = class_pixels

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Scaled latents and captions for one micro-batch."""
        config = self.config
        index = self.draw_indices(generator)
        rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
        captions = [self._caption(self.examples[int(i) % len(self.examples)], rng) for i in index]
        dropout = config.caption_dropout
        captions = [c if dropout == 0 or rng.random() >= dropout else "" for c in captions]
        if self.latent_cache is not None:
            mean, std = self.latent_cache
            eps = torch.randn(mean[index].shape, generator=generator).to(self.device)
            latents = mean[index] + std[index] * eps
        else:
            pixels = self.pixels[index]
            if config.color_jitter:
                pixels = torch.stack([color_jitter(p, generator) for p in pixels])
            with torch.no_grad():
                latents = self.vae.encode(pixels.to(self.device)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor, captions

    def draw_indices(self, generator: torch.Generator) -> torch.Tensor:
        """Which images (mirrors after the originals) a micro-batch takes: the first draw."""
        size = self.config.train_batch_size
        return torch.randint(0, len(self.pixels), (size,), generator=generator)

    def _caption(self, example: InstanceExample, rng: random.Random) -> str:
        config = self.config
        if config.method == "pti":
            return caption_for(
                example, config.use_template, config.learned_tokens, rng,
                token_at_data=config.placeholder_token_at_data,
            )  # fmt: skip
        return example.caption or config.instance_prompt

    def class_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents and captions of prior-preservation images (when there are any)."""
        assert self.class_pixels is not None
        size = self.config.train_batch_size
        index = torch.randint(0, len(self.class_pixels), (size,), generator=generator)
        with torch.no_grad():
            dist = self.vae.encode(self.class_pixels[index].to(self.device)).latent_dist
        return dist.mean * self.vae.config.scaling_factor, [self.config.class_prompt] * size


def generate_class_images(
    model_path: str, config: TrainingConfig, resolution: int, seed: int, device: torch.device,
    vae: Any,
) -> torch.Tensor:  # fmt: skip
    """Prior-preservation images of the class prompt, drawn by the base model (at the
    configured revision, with the VAE that training uses)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_path, revision=config.revision or None, vae=vae, safety_checker=None,
        requires_safety_checker=False,
    ).to(device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    images = [
        pipe(
            config.class_prompt, height=resolution, width=resolution, num_inference_steps=25,
            generator=generator,
        ).images[0]
        for _ in range(config.num_class_images)
    ]  # fmt: skip
    return torch.stack([to_tensor(image, resolution) for image in images])
