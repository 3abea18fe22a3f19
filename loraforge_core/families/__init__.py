"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL, FLUX.1 and the next ones.

One module per family implements ``base.Family``: its data (pipelines per mode, text encoders,
denoiser, embedding keys, kohya prefixes) and its behaviour (LoRA targets, prompt encoding for
training and serving, the denoiser's inputs, sizes). This package registers them and tells a
model's family from its folder's ``model_index.json``. A family lists the services that run it
end to end; a service refuses a model of any other family when it is named, naming it.
Adding a family: its module, its tiny base, its tests, and one line in ``FAMILIES``
(docs/families.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge_core.errors import FailedPrecondition
from loraforge_core.families.base import Family, PromptEmbeddings
from loraforge_core.families.flux import FLUX
from loraforge_core.families.sd import SD
from loraforge_core.families.sdxl import SDXL
from loraforge_core.families.zimage import Z_IMAGE

# Families recognised by name only, so that a refusal can say what the model is.
_KNOWN_UNSERVED = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "PixArtSigmaPipeline": "PixArt-Sigma",
    "SanaPipeline": "Sana",
}

FAMILIES = (SD, SDXL, FLUX, Z_IMAGE)
__all__ = ["FAMILIES", "FLUX", "SD", "SDXL", "Z_IMAGE", "Family", "PromptEmbeddings"]


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
