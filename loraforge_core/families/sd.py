"""Stable Diffusion 1.x/2.x: a UNet on one CLIP text encoder, epsilon or v prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge_core.families.base import Family, PromptEmbeddings
from loraforge_core.targets import DEFAULT_CLIP_TARGETS, DEFAULT_UNET_TARGETS, EXTENDED_UNET_TARGETS

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StableDiffusion(Family):
    # What the pipeline's encode_prompt returns, in order: its call's keyword arguments.
    prompt_outputs = ("prompt_embeds", "negative_prompt_embeds")

    def lora_targets(self, component: str, extended: bool = False) -> tuple[str, ...]:
        if component == self.denoiser:
            return DEFAULT_UNET_TARGETS + (EXTENDED_UNET_TARGETS if extended else ())
        return DEFAULT_CLIP_TARGETS

    def kohya_model_version(self, conditioning_dim: int) -> str:
        return "sd_v2" if conditioning_dim == 1024 else "sd_v1"  # OpenCLIP-H vs CLIP-L

    def encode_prompts(
        self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
        device: torch.device | str = "cpu",
    ) -> PromptEmbeddings:  # fmt: skip
        """The text encoder's output for prompts padded to the tokenizer's length."""
        (tokenizer,), (text_encoder,) = tokenizers, text_encoders
        return PromptEmbeddings(text_encoder(clip_ids(tokenizer, prompts, device))[0])

    def denoiser_inputs(self, embeddings: PromptEmbeddings, time_ids: Any = None) -> dict:
        return {"encoder_hidden_states": embeddings.hidden}

    def pipeline_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, num_images: int, guided: bool,
    ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        encoded = pipe.encode_prompt(
            prompt=prompt, device=pipe._execution_device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=guided, negative_prompt=negative_prompt or None,
        )  # fmt: skip
        return dict(zip(self.prompt_outputs, encoded, strict=True))

    def classifier_free(self, pipe: Any, guidance_scale: float) -> bool:
        # An LCM-distilled UNet takes the guidance as an input (time_cond_proj_dim) instead.
        return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def default_size(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor

    def inpainting_base(self, pipe: Any) -> bool:
        return int(pipe.unet.config.in_channels) == 9

    def conditioning_dims(self, pipe: Any) -> tuple[int, int]:
        return (int(pipe.text_encoder.config.hidden_size),
                int(pipe.unet.config.cross_attention_dim))  # fmt: skip


def clip_ids(tokenizer: Any, prompts: list[str], device: torch.device | str) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as the pipelines tokenize."""
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)  # fmt: skip


SD = StableDiffusion(
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
