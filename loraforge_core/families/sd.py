"""Stable Diffusion 1.x/2.x: a UNet on one CLIP text encoder, epsilon or v prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge_core.families.base import Family, PromptEmbeddings
from loraforge_core.families.objectives import NoisePrediction
from loraforge_core.targets import DEFAULT_CLIP_TARGETS, DEFAULT_UNET_TARGETS, EXTENDED_UNET_TARGETS

if TYPE_CHECKING:
    import torch

    from loraforge_core.families.objectives import Noised, ObjectiveOptions


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

    def converter_options(self, pipe: Any) -> dict[str, Any]:
        # The UNet's config lets diffusers map kohya's SGM block names (input_blocks_4_1, as
        # sd-scripts writes SDXL files) to its own, as load_lora_weights does.
        return {"unet_config": pipe.unet.config}

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
        text_tokens: int = 0,
    ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        encoded = pipe.encode_prompt(
            prompt=prompt, device=pipe._execution_device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=guided, negative_prompt=negative_prompt or None,
        )  # fmt: skip
        return dict(zip(self.prompt_outputs, encoded, strict=True))

    def classifier_free(self, pipe: Any, guidance_scale: float) -> bool:
        # An LCM-distilled UNet takes the guidance as an input (time_cond_proj_dim) instead.
        return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def objective(self, scheduler: Any, options: ObjectiveOptions) -> NoisePrediction:
        return NoisePrediction(scheduler, options)

    def predict(
        self, denoiser: Any, noised: Noised, embeddings: PromptEmbeddings, *,
        dtype: torch.dtype, time_ids: Any = None, conditioning: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        import torch

        noisy = noised.noisy
        if conditioning is not None:  # an inpainting UNet's mask and masked image
            noisy = torch.cat([noisy, conditioning], dim=1)
        inputs = self.denoiser_inputs(embeddings, time_ids)
        return denoiser(noisy.to(dtype), noised.timesteps, **inputs).sample

    def native_resolution(self, denoiser: Any, vae: Any) -> int:
        # A replacement VAE's own sample_size may say otherwise: the UNet's side decides.
        return int(denoiser.config.sample_size) * vae_factor(vae)

    def size_step(self, denoiser: Any, vae: Any) -> int:
        """The VAE's factor times the UNet's (each down block halves)."""
        return vae_factor(vae) * 2 ** (len(denoiser.config.block_out_channels) - 1)

    def inpainting_denoiser(self, denoiser: Any) -> bool:
        return int(denoiser.config.in_channels) == 9  # 4 latent + 1 mask + 4 masked image

    def conditioning_dim(self, denoiser: Any) -> int:
        return int(denoiser.config.cross_attention_dim)


def vae_factor(vae: Any) -> int:
    """How many pixels a latent's side stands for (each VAE block but the last halves)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


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
