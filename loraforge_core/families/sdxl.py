"""Stable Diffusion XL: SD's UNet conditioned on two CLIP encoders' penultimate states side by
side, the second's pooled projection, and each image's size and crop (micro-conditioning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge_core.families.base import PromptEmbeddings
from loraforge_core.families.sd import StableDiffusion, clip_ids

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StableDiffusionXL(StableDiffusion):
    prompt_outputs = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    def kohya_model_version(self, conditioning_dim: int) -> str:
        return "sdxl_base_v1-0"

    def encode_prompts(
        self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
        device: torch.device | str = "cpu",
    ) -> PromptEmbeddings:  # fmt: skip
        import torch

        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
            output = text_encoder(clip_ids(tokenizer, prompts, device), output_hidden_states=True)
            if output[0].ndim == 2:  # the projection model's pooled, projected embedding
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)

    def denoiser_inputs(self, embeddings: PromptEmbeddings, time_ids: Any = None) -> dict:
        """SD's, with the pooled embedding and the (original size, crop top-left, target
        size) of each image, (height, width) each: the UNet's ``added_cond_kwargs``."""
        if time_ids is None:
            raise ValueError("an SDXL UNet needs the images' sizes and crops")
        return {
            "encoder_hidden_states": embeddings.hidden,
            "added_cond_kwargs": {"text_embeds": embeddings.pooled,
                                  "time_ids": time_ids.to(embeddings.pooled)},
        }  # fmt: skip


SDXL = StableDiffusionXL(
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
    tokenizer_classes=("CLIPTokenizer", "CLIPTokenizer"),
    embedding_keys=("clip_l", "clip_g"),
    kohya_prefixes={
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    },
    services=frozenset({"generator", "trainer"}),
)
