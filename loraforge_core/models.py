"""Base models: build the tiny offline model, resolve the default, build random-init pipelines.

The tiny model is a real diffusers Stable Diffusion pipeline (same classes and folder layout as
a hub model) with small configs, so every code path that loads a model by
``from_pretrained(path_or_id)`` runs unchanged on it without a network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge_core import families
from loraforge_core.architectures import TINY, TINY_SDXL
from loraforge_core.files import file_lock
from loraforge_core.tiny_tokenizers import write_tiny_tokenizer

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

TINY_MODEL_NAMES = ("", "tiny", "loraforge/tiny")
TINY_MODEL_VERSION = "tiny-sd-v2"
TINY_ARCHITECTURES = {"sd": TINY, "sdxl": TINY_SDXL}
CACHE_ENV = "LORAFORGE_CACHE"
# The tiny model trained on the toy world (tools/train_tiny_base.py), shipped in the package.
TRAINED_TINY_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-sd"
# Its twins of other families, trained on the same world (tools/train_tiny_base.py) and shipped
# beside it, named "tiny-<family>" (or "loraforge/tiny-<family>"): for the tests that need a
# model of the family that draws. SDXL's starts from its VAE and UNet; FLUX.1's and Z-Image's
# from its VAE, their transformers and text encoders from scratch.
SHIPPED_TWINS = ("sdxl", "flux", "zimage")
# Untrained tiny models (random weights, for plumbing tests), built into the cache on first use:
# "tiny-random" (SD, the shipped one's architecture), "tiny-<family>-random" for the others.
RANDOM_VERSIONS = {"sd": TINY_MODEL_VERSION, "flux": "tiny-flux-v1", "zimage": "tiny-zimage-v1"}


def cache_dir() -> Path:
    """Where models built on first use live: $LORAFORGE_CACHE, else ~/.cache/loraforge."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "loraforge"


def build_pipeline(
    architecture: dict[str, Any] = TINY, *, seed: int = 0, tokenizer_dir: Path | None = None
) -> Any:
    """A pipeline with random weights (fixed seed) from component configs: Stable Diffusion,
    or SDXL where the architecture has a second text encoder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = tokenizer_dir or Path(tmp)
        vocab_size = write_tiny_tokenizer(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
        torch.manual_seed(seed)
        text_encoder = _text_encoder(CLIPTextModel, architecture["text_encoder"], tokenizer,
                                     vocab_size)  # fmt: skip
        second = architecture.get("text_encoder_2")
        text_encoder_2 = (
            _text_encoder(CLIPTextModelWithProjection, second, tokenizer, vocab_size)
            if second
            else None
        )
        unet = UNet2DConditionModel(**architecture["unet"])
        vae = AutoencoderKL(**architecture["vae"])
        scheduler = DDIMScheduler(**architecture["scheduler"])
        if text_encoder_2 is not None:
            return StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
            )  # fmt: skip
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _text_encoder(cls: Any, config: dict[str, Any], tokenizer: Any, vocab_size: int) -> Any:
    from transformers import CLIPTextConfig

    config = {"vocab_size": vocab_size, **config}
    if config["vocab_size"] < len(tokenizer):
        raise ValueError("text encoder vocabulary is smaller than the tokenizer's")
    return cls(
        CLIPTextConfig(
            **config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_builders() -> dict[str, Callable[[int], Any]]:
    """Family name -> a function of a seed that builds its tiny pipeline (random weights)."""
    from loraforge_core.families import flux, zimage

    return {
        "sd": lambda seed: build_pipeline(TINY, seed=seed),
        "sdxl": lambda seed: build_pipeline(TINY_SDXL, seed=seed),
        "flux": flux.build_tiny,
        "zimage": zimage.build_tiny,
    }


def save_tiny_model(folder: Path, *, seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny pipeline of a family (``tiny_builders``) and save it with
    ``save_pretrained`` (atomically) into folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        pipe = tiny_builders()[family](seed)
        pipe.save_pretrained(staging, safe_serialization=True)
        name = "loraforge/tiny" + ("" if family == "sd" else f"-{family}")
        (staging / "loraforge_model.json").write_text(
            json.dumps({"name": name, "version": TINY_MODEL_VERSION, "seed": seed})
        )
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_inpainting_model(folder: Path, source: str = "", *, seed: int = 0) -> Path:
    """An inpainting model made from a text-to-image one as SD's inpainting models were: the
    UNet's first convolution takes 5 more channels (the mask and the masked image's latents).
    Their weights start small and random (seeded), so the extra input acts from the start."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    base = StableDiffusionInpaintPipeline.from_pretrained(
        resolve_model(source), safety_checker=None, requires_safety_checker=False
    )
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    state = base.unet.state_dict()
    weight = state["conv_in.weight"]
    extra = torch.randn((weight.shape[0], 5, *weight.shape[2:]),
                        generator=torch.Generator().manual_seed(seed)) * weight.std()  # fmt: skip
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    unet.load_state_dict(state)
    base.unet = unet
    base.register_modules(unet=unet)
    base.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def random_tiny_model_path(family: str = "sd") -> Path:
    """An untrained tiny model's folder in the cache, built on first use (safe across
    processes): SD's has the shipped one's architecture, the others their family's tiny
    builder's (``tiny_builders``); random weights, for plumbing tests."""
    version = RANDOM_VERSIONS[family]
    folder = cache_dir() / "models" / version
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{version}.lock"):
        if not (folder / "model_index.json").exists():
            save_tiny_model(folder, family=family)
    return folder


def default_model_path() -> Path:
    """The embedded default: the tiny model trained on the toy world, shipped in the package."""
    return TRAINED_TINY_MODEL


def resolve_model(name_or_path: str | None) -> str:
    """The ``from_pretrained`` argument for a model setting: the tiny model when unset."""
    name = (name_or_path or "").strip()
    if name in TINY_MODEL_NAMES:
        return str(default_model_path())
    short = name.removeprefix("loraforge/")
    if short == "tiny-random":
        return str(random_tiny_model_path())
    family = short.removeprefix("tiny-")
    if short.startswith("tiny-") and family in SHIPPED_TWINS:
        return str(TRAINED_TINY_MODEL.with_name(short))
    if short.startswith("tiny-") and short.endswith("-random"):
        family = family.removesuffix("-random")
        if family in RANDOM_VERSIONS:
            return str(random_tiny_model_path(family))
    return name


def preload(service: str = "") -> None:
    """Import what loading a model of every family ``service`` runs (every service's, where
    none is named) resolves by name (diffusers and transformers import each class on first use;
    about 5 s of CPU in all): a process forked after this (the trainer's zygote's jobs, the
    forkserver's servers) starts without importing. No torch operation runs here: forking after
    one is unsafe."""
    import diffusers
    import diffusers.image_processor
    import peft  # noqa: F401  the LoRA layers of both services
    import transformers

    for family in families.served_by(service) if service else families.FAMILIES:
        names = (family.denoiser_class, family.training_scheduler, family.preview_scheduler,
                 *family.pipelines.values())  # fmt: skip
        for name in ("AutoencoderKL", *names):
            getattr(diffusers, name)
        for name in (*family.text_encoder_classes, *family.tokenizer_classes):
            getattr(transformers, name)


def load_pipeline(
    name_or_path: str | None, *, device: torch.device | str = "cpu", dtype: Any = None
) -> DiffusionPipeline:
    """Load a text-to-image pipeline of the model's family with the real loading code
    (``from_pretrained``); FailedPrecondition for a family loraforge does not serve."""
    import diffusers

    path = resolve_model(name_or_path)
    family = families.require_served(path, "generator") or families.SD
    cls = getattr(diffusers, family.pipelines["txt2img"])
    kwargs: dict[str, Any] = {}
    if "safety_checker" in cls._optional_components:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = cls.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> None:
    """``python -m loraforge_core.models OUT``: write the tiny model to a folder."""
    parser = argparse.ArgumentParser(description="Build a tiny offline model (random weights)")
    parser.add_argument("output", type=Path, help="folder to write (replaced if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(tiny_builders()), default="sd")
    args = parser.parse_args(argv)
    print(save_tiny_model(args.output, seed=args.seed, family=args.family))


if __name__ == "__main__":
    main()
