"""Training captions: lora_pti's templates with the placeholder tokens, or each image's own
caption (or its file name's words). Torch-free: the trainer server checks captions at
CreateJob."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol


class Captioned(Protocol):
    """An instance image's text (data.InstanceExample)."""

    filename: str
    caption: str


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


def caption_from_filename(filename: str) -> str:
    """``a_red_circle (2).png`` -> ``a red circle``."""
    stem = Path(filename).stem
    stem = re.sub(r"\(\d+\)$", "", stem).strip()
    return re.sub(r"[_\-]+", " ", stem).strip()


def placeholder_text(tokens: list[str]) -> str:
    return "".join(tokens)


def caption_for(
    example: Captioned,
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
