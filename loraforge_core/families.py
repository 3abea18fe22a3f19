"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL and the next ones.

A family is recognised from its folder's ``model_index.json`` (the pipeline class diffusers
saved it with) and says what the rest of the code needs to know about it: its pipelines per
mode, its text encoders, what its prompt encoding returns, how learned tokens are stored in
A1111 and ComfyUI embedding files, and kohya's key prefixes. The trainer, the generator, the
bundle and interop ask the family; nothing else branches on it. A family lists the services
that run it end to end; a service refuses a model of any other family when it is named,
naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge_core.errors import FailedPrecondition


@dataclass(frozen=True)
class Family:
    name: str  # as operators and manifests spell it
    title: str  # for people
    # mode (txt2img, img2img, inpaint) -> diffusers class; model_index.json's "_class_name"
    # is one of them
    pipelines: dict[str, str]
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # transformers class of each text encoder
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    # Which hidden states of each text encoder the UNet reads: None, its output (after the
    # final layer norm); -2, the penultimate layer's, side by side over the encoders (SDXL).
    text_hidden_layer: int | None = None
    # An A1111/ComfyUI embedding file's key per text encoder ("" : the one-tensor form).
    embedding_keys: tuple[str, ...] = ("",)
    # kohya/A1111 LoRA key prefix per component.
    kohya_prefixes: dict[str, str] = field(default_factory=dict)
    # What the pipeline's encode_prompt returns, in order: its call's keyword arguments.
    prompt_outputs: tuple[str, ...] = ("prompt_embeds", "negative_prompt_embeds")
    services: frozenset[str] = frozenset()  # "generator", "trainer"
    # kohya's ss_base_model_version ("": sd_v1 or sd_v2, told apart by the model's shapes)
    kohya_model_version: str = ""

    @property
    def components(self) -> tuple[str, ...]:
        """The modules LoRA can adapt: the UNet, then each text encoder."""
        return ("unet", *self.text_encoders)

    @property
    def micro_conditioned(self) -> bool:
        """Whether the UNet also takes the pooled text embedding and the image's size and
        crop (SDXL's ``added_cond_kwargs``: ``text_embeds`` and ``time_ids``)."""
        return "pooled_prompt_embeds" in self.prompt_outputs


SD = Family(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    pipelines={
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    },
    kohya_prefixes={"unet": "lora_unet_", "text_encoder": "lora_te_"},
    services=frozenset({"generator", "trainer"}),
)

SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    pipelines={
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
    text_encoders=("text_encoder", "text_encoder_2"),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    tokenizers=("tokenizer", "tokenizer_2"),
    text_hidden_layer=-2,
    embedding_keys=("clip_l", "clip_g"),
    kohya_prefixes={
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    },
    prompt_outputs=(
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ),
    services=frozenset({"generator", "trainer"}),
    kohya_model_version="sdxl_base_v1-0",
)

# Families recognised by name only, so that a refusal can say what the model is.
_KNOWN_UNSERVED = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX.1",
    "PixArtSigmaPipeline": "PixArt-Sigma",
    "SanaPipeline": "Sana",
}

FAMILIES = (SD, SDXL)


def served_by(service: str) -> list[Family]:
    return [f for f in FAMILIES if service in f.services]


def by_name(name: str) -> Family:
    """A known family by its name (a manifest's ``family``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {[f.name for f in FAMILIES]}")


def family_of_class(class_name: str) -> Family:
    """The family of a pipeline class name; an unserved stand-in for ones we do not know."""
    for family in FAMILIES:
        if class_name in family.pipelines.values():
            return family
    title = _KNOWN_UNSERVED.get(class_name, class_name.removesuffix("Pipeline") or "unknown")
    return Family(name=class_name, title=title, pipelines={"txt2img": class_name})


def of_pipeline(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline."""
    return family_of_class(type(pipe).__name__)


def read_model_index(name_or_path: str, *, local_only: bool = False) -> dict[str, Any] | None:
    """A model's ``model_index.json``: from the folder, else through diffusers' own resolution
    of a hub id (its cache only with ``local_only``); None where it cannot be read."""
    folder = Path(name_or_path)
    if folder.is_dir():
        index = folder / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(name_or_path, local_files_only=local_only)
    except (OSError, ValueError):
        return None


def detect(name_or_path: str, *, local_only: bool = False) -> Family | None:
    """The family of a model folder or id, or None where its index cannot be read."""
    index = read_model_index(name_or_path, local_only=local_only)
    if index is None:
        return None
    return family_of_class(str(index.get("_class_name", "")))


def refusal(family: Family, name_or_path: str, service: str) -> str:
    supported = ", ".join(f"{f.title} ({f.name})" for f in served_by(service))
    return (
        f"the model {name_or_path!r} is {family.title} ({family.pipelines['txt2img']}), which "
        f"the loraforge {service} does not support yet; supported families: {supported}"
    )


def require_served(name_or_path: str, service: str, *, local_only: bool = False) -> Family | None:
    """The model's family, FailedPrecondition where ``service`` does not run it; None where
    the index cannot be read here (the load that follows reports that)."""
    family = detect(name_or_path, local_only=local_only)
    if family is not None and service not in family.services:
        raise FailedPrecondition(refusal(family, name_or_path, service))
    return family
