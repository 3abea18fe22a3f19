"""Instance images, captions and augmentation (as in lora_pti's PivotalTuningDatasetCapation)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from trainer_service.training.captions import caption_for
from trainer_service.training.masks import loss_weights, random_holes

if TYPE_CHECKING:
    from loraforge_core.families import Family
    from trainer_service.config import TrainingConfig


@dataclass
class InstanceExample:
    """One decoded instance image with its optional caption, file name and loss mask (L)."""

    image: Image.Image
    filename: str = ""
    caption: str = ""
    mask: Image.Image | None = None


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, centre-crop, scale to [-1, 1], CHW."""
    return _pixels(image, (resolution, resolution))


def _pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Scaled to cover ``size`` (width, height), centre-cropped to it, in [-1, 1], CHW."""
    image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def size_and_crop(image_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning of an image ``image_size`` (width, height) cut to ``size`` as
    ``_pixels`` cuts it: (original height, original width, crop top, crop left, target height,
    target width), the crop's corner in the resized image (diffusers' SDXL training scripts)."""
    (width, height), (target_w, target_h) = image_size, size
    scale = max(target_w / width, target_h / height)
    top = round((height * scale - target_h) / 2)
    left = round((width * scale - target_w) / 2)
    return torch.tensor([height, width, top, left, target_h, target_w], dtype=torch.float32)


def mirrored(time_ids: torch.Tensor) -> torch.Tensor:
    """The micro-conditioning of an image flipped left to right after its crop: the crop's
    left edge counted from the other side."""
    height, width, top, left, target_h, target_w = time_ids.tolist()
    resized_width = round(width * max(target_w / width, target_h / height))
    return torch.tensor([height, width, top, resized_width - target_w - left, target_h, target_w])


def _mask(mask: Image.Image | None, size: tuple[int, int]) -> torch.Tensor:
    """A loss mask cut like its image, in [0, 1], [1, H, W]; no mask: all subject."""
    if mask is None:
        return torch.ones(1, size[1], size[0])
    fitted = ImageOps.fit(mask.convert("L"), size, method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).unsqueeze(0)


def buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) shapes of at most ``resolution**2`` pixels, sides multiples of ``step``
    between half and twice the resolution (so aspect ratios up to 4:1), each width's tallest.
    At 512 and a step of 64: 256x1024, 320x768, 384x640, 448x576, 512x512 ... 1024x256."""
    low = max(step, math.ceil(resolution / 2 / step) * step)
    high = 2 * resolution // step * step
    shapes = []
    for width in range(low, high + 1, step):
        height = min(resolution * resolution // width // step * step, high)
        if height >= low:
            shapes.append((width, height))
    return shapes


def bucket_for(size: tuple[int, int], shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The shape whose aspect ratio is nearest the image's (in log ratio); then the larger."""
    aspect = math.log(size[0] / size[1])
    return min(shapes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def color_jitter(
    pixels: torch.Tensor, generator: torch.Generator, strength: float = 0.1
) -> torch.Tensor:
    """Brightness and contrast jitter of +-strength (torchvision's ColorJitter(0.1, 0.1))."""
    factors = 1 + (torch.rand(2, generator=generator) * 2 - 1) * strength
    image = (pixels + 1) / 2 * factors[0]
    mean = image.mean()
    image = (image - mean) * factors[1] + mean
    return image.clamp(0, 1) * 2 - 1


@dataclass
class Batch:
    """One micro-batch: scaled latents, captions, and where they apply, the loss weights per
    latent pixel ``[B, 1, h, w]`` and the inpainting UNet's extra input channels (the mask
    and the masked image's latents) ``[B, 1 + C, h, w]``."""

    latents: torch.Tensor
    captions: list[str]
    weights: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # [B, 6]: ``size_and_crop`` of each image


class TrainingData:
    """The instance images as training batches: pixels per image (and its mirror), with
    cached latents their VAE posteriors, and for prior preservation the class images.

    With bucketing each image keeps its aspect ratio: it is cut to the nearest bucket shape
    (``buckets``), and a micro-batch's images share one. ``batch`` draws everything from the
    step's generator, so a step replays exactly."""

    def __init__(
        self, config: TrainingConfig, examples: list[InstanceExample], vae: Any,
        resolution: int, device: torch.device, class_pixels: torch.Tensor | None = None,
        bucket_step: int = 8,
    ) -> None:  # fmt: skip
        self.config = config
        self.examples = examples
        self.vae = vae
        self.device = device
        shapes = buckets(resolution, bucket_step)
        sizes = [
            bucket_for(e.image.size, shapes) if config.aspect_ratio_bucketing
            else (resolution, resolution)
            for e in examples
        ]  # fmt: skip
        pixels = [_pixels(e.image, size) for e, size in zip(examples, sizes, strict=True)]
        masks = [_mask(e.mask, size) for e, size in zip(examples, sizes, strict=True)]
        time_ids = [size_and_crop(e.image.size, s) for e, s in zip(examples, sizes, strict=True)]
        if config.random_flip:
            pixels += [p.flip(-1) for p in pixels]
            masks += [m.flip(-1) for m in masks]
            time_ids += [mirrored(t) for t in time_ids]
        self.pixels, self.masks, self.time_ids = pixels, masks, time_ids
        self.masked = any(e.mask is not None for e in examples)
        self.shapes = [tuple(p.shape[-2:]) for p in pixels]  # (height, width) of each
        self.latent_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if config.cached_latents:
            with torch.no_grad():
                dists = [vae.encode(p[None].to(device)).latent_dist for p in pixels]
            self.latent_cache = [(d.mean[0], d.std[0]) for d in dists]
        self.class_pixels = class_pixels

    def batch(self, generator: torch.Generator) -> Batch:
        """The micro-batch of one step."""
        config = self.config
        index = self.draw_indices(generator)
        rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
        captions = [self._caption(self.examples[int(i) % len(self.examples)], rng) for i in index]
        dropout = config.caption_dropout
        captions = [c if dropout == 0 or rng.random() >= dropout else "" for c in captions]
        pixels = torch.stack([self.pixels[i] for i in index])
        if self.latent_cache is not None:
            mean = torch.stack([self.latent_cache[i][0] for i in index])
            std = torch.stack([self.latent_cache[i][1] for i in index])
            eps = torch.randn(mean.shape, generator=generator).to(self.device)
            latents = mean + std * eps
        else:
            if config.color_jitter:
                pixels = torch.stack([color_jitter(p, generator) for p in pixels])
            with torch.no_grad():
                latents = self.vae.encode(pixels.to(self.device)).latent_dist.sample()
        time_ids = torch.stack([self.time_ids[i] for i in index]).to(self.device)
        batch = Batch(normalized(self.vae, latents), captions, time_ids=time_ids)
        if self.masked:
            masks = torch.stack([self.masks[i] for i in index]).to(self.device)
            batch.weights = loss_weights(masks, latents.shape[-2:], config.mask_temperature)
        if config.train_inpainting:
            batch.conditioning = self.inpainting_conditioning(pixels, generator)
        return batch

    def draw_indices(self, generator: torch.Generator) -> list[int]:
        """Which images (mirrors after the originals) a micro-batch takes: the first draw.

        All of one shape: uniform draws; with several bucket shapes, the first image draws
        the bucket and the others are drawn from its images."""
        size = self.config.train_batch_size
        first = torch.randint(0, len(self.pixels), (size,), generator=generator).tolist()
        if len(set(self.shapes)) == 1:
            return first
        members = [i for i, s in enumerate(self.shapes) if s == self.shapes[first[0]]]
        picks = torch.randint(0, len(members), (size - 1,), generator=generator).tolist()
        return [first[0]] + [members[p] for p in picks]

    def inpainting_conditioning(
        self, pixels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """lora_pti's inpainting input: random holes, and the latents of the image with the
        holes blanked, the mask resized to the latent grid in front."""
        height, width = pixels.shape[-2:]
        holes = torch.stack([random_holes(height, width, generator) for _ in pixels])
        masked = pixels * (holes < 0.5)
        with torch.no_grad():
            dist = self.vae.encode(masked.to(self.device)).latent_dist
        masked_latents = normalized(self.vae, dist.mean)
        holes = F.interpolate(holes.to(self.device), size=masked_latents.shape[-2:])
        return torch.cat([holes, masked_latents], dim=1)

    def _caption(self, example: InstanceExample, rng: random.Random) -> str:
        config = self.config
        if config.method == "pti":
            return caption_for(
                example, config.use_template, config.learned_tokens, rng,
                token_at_data=config.placeholder_token_at_data,
            )  # fmt: skip
        return example.caption or config.instance_prompt

    def class_batch(self, generator: torch.Generator) -> Batch:
        """Latents and captions of prior-preservation images (when there are any)."""
        assert self.class_pixels is not None
        size = self.config.train_batch_size
        index = torch.randint(0, len(self.class_pixels), (size,), generator=generator)
        with torch.no_grad():
            dist = self.vae.encode(self.class_pixels[index].to(self.device)).latent_dist
        latents = normalized(self.vae, dist.mean)
        height, width = self.class_pixels.shape[-2:]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * size, dtype=torch.float32)
        return Batch(latents, [self.config.class_prompt] * size, time_ids=time_ids.to(self.device))


def normalized(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the denoiser sees them: ``(latents - shift) * scale`` (SD's VAEs have
    no shift; FLUX.1's does)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def generate_class_images(
    model_path: str, family: Family, config: TrainingConfig, resolution: int, seed: int,
    device: torch.device, vae: Any,
) -> torch.Tensor:  # fmt: skip
    """Prior-preservation images of the class prompt, drawn by the base model through its
    family's pipeline, in float32 (at the configured revision, with the VAE that training
    uses); the pipeline is dropped afterwards."""
    import diffusers

    cls = getattr(diffusers, family.pipelines["txt2img"])
    extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(
        model_path, revision=config.revision or None, vae=vae,
        **(extra if "safety_checker" in cls._optional_components else {}),
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
