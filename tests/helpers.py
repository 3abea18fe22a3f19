"""Shared test helpers: toy instance images and request builders."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


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
    model: str,
    root,
    *,
    seed: int,
    token: str | None = None,
    text_encoder: bool = True,
    std: float = 0.5,
):
    """A real bundle whose LoRA weights are random (non-zero B), for serving tests.

    Made by the trainer's own injection and export code, so the files are what training writes.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from loraforge_core.bundle import Manifest, store_bundle
    from trainer_service.config import DEFAULT_CLIP_TARGETS, DEFAULT_UNET_TARGETS
    from trainer_service.training import lora

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    lora.add_unet_lora(unet, lora.lora_config(4, 4, list(DEFAULT_UNET_TARGETS), 0.0))
    text = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    if text_encoder:
        lora.add_text_encoder_lora(text, lora.lora_config(4, 4, list(DEFAULT_CLIP_TARGETS), 0.0))
    with torch.no_grad():
        for module in (unet, text):
            for param in lora.lora_parameters(module):
                param.normal_(0, std)
    state = lora.diffusers_lora_state(
        lora.peft_state(unet), lora.peft_state(text) if text_encoder else None, 4, 4
    )
    embeddings = {token: torch.randn(text.config.hidden_size)} if token else {}
    manifest = Manifest(
        base_model=str(model), method="pti", tokens=[token] if token else [], rank=4, alpha=4,
        unet_target_modules=list(DEFAULT_UNET_TARGETS),
        text_encoder_target_modules=list(DEFAULT_CLIP_TARGETS) if text_encoder else [],
        global_step=0, text_hidden_size=text.config.hidden_size,
        cross_attention_dim=unet.config.cross_attention_dim,
    )  # fmt: skip
    return store_bundle(root, state, embeddings, manifest)
