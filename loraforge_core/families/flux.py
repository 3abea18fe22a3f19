"""FLUX.1 (dev, schnell and their fine-tunes): a rectified-flow transformer on packed 2x2
latent patches, conditioned on T5's token states and CLIP-L's pooled embedding; dev-like
models take the guidance scale as an input (no negative half), schnell-like ones none.

LoRA adapts the transformer and CLIP-L: diffusers' FLUX loader reads no T5 LoRA, so adapters
that users load elsewhere carry none either; learned tokens live in both encoders.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge_core.families.base import PromptEmbeddings
from loraforge_core.families.flow import FlowTransformer
from loraforge_core.families.sd import clip_ids, vae_factor
from loraforge_core.targets import DEFAULT_CLIP_TARGETS

if TYPE_CHECKING:
    import torch

    from loraforge_core.families.objectives import Noised

# diffusers' train_dreambooth_lora_flux.py defaults: every attention projection of the
# double-stream blocks (image and text streams) and their feed-forwards; the single-stream
# blocks' attention (the same names) and their MLP input.
TRANSFORMER_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
)  # fmt: skip
# Extended: also the single blocks' (and the final) output projections and the modulations.
EXTENDED_TRANSFORMER_TARGETS = ("proj_out", "norm.linear", "norm1.linear",
                                "norm1_context.linear")  # fmt: skip
MAX_SEQUENCE_LENGTH = 512  # FLUX.1-dev's T5 length (schnell was distilled at 256)


@dataclass(frozen=True)
class Flux(FlowTransformer):
    def lora_targets(self, component: str, extended: bool = False) -> tuple[str, ...]:
        if component == self.denoiser:
            return TRANSFORMER_TARGETS + (EXTENDED_TRANSFORMER_TARGETS if extended else ())
        return DEFAULT_CLIP_TARGETS

    def kohya_model_version(self, conditioning_dim: int) -> str:
        return "flux1"

    def encode_prompts(
        self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
        device: torch.device | str = "cpu",
    ) -> PromptEmbeddings:  # fmt: skip
        """T5's token states and CLIP-L's pooled output, as ``FluxPipeline.encode_prompt``."""
        (clip_tokenizer, t5_tokenizer), (clip, t5) = tokenizers, text_encoders
        pooled = clip(clip_ids(clip_tokenizer, prompts, device)).pooler_output
        ids = t5_tokenizer(
            prompts, padding="max_length", truncation=True,
            max_length=self.text_length(t5_tokenizer), return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        return PromptEmbeddings(t5(ids)[0], pooled)

    def denoiser_inputs(self, embeddings: PromptEmbeddings, time_ids: Any = None) -> dict:
        return {"encoder_hidden_states": embeddings.hidden,
                "pooled_projections": embeddings.pooled}  # fmt: skip

    def pipeline_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, num_images: int, guided: bool,
        text_tokens: int = 0,
    ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=pipe._execution_device,
            num_images_per_prompt=num_images,
            max_sequence_length=text_tokens or self.text_length(pipe.tokenizer_2),
        )  # fmt: skip
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def classifier_free(self, pipe: Any, guidance_scale: float) -> bool:
        return False  # guidance-distilled: dev takes the scale as an input, schnell ignores it

    def call_options(self, pipe: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.text_length(pipe.tokenizer_2)}

    def predict(
        self, denoiser: Any, noised: Noised, embeddings: PromptEmbeddings, *,
        dtype: torch.dtype, time_ids: Any = None, conditioning: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        """The transformer on 2x2 patches of the latents (FluxPipeline's packing), with the
        images' and texts' position ids, and the guidance input of a dev-like model."""
        import torch

        if conditioning is not None:
            raise ValueError("FLUX.1 inpainting models (Fill) are not trained here")
        noisy = noised.noisy
        batch, channels, height, width = noisy.shape
        config = getattr(denoiser, "module", denoiser).config  # accelerate may wrap it
        guidance_input = (torch.full((batch,), guidance, device=noisy.device, dtype=dtype)
                          if config.guidance_embeds else None)  # fmt: skip
        packed = denoiser(
            hidden_states=pack(noisy).to(dtype),
            timestep=(noised.timesteps / 1000).to(dtype),
            guidance=guidance_input,
            pooled_projections=embeddings.pooled.to(dtype),
            encoder_hidden_states=embeddings.hidden.to(dtype),
            txt_ids=torch.zeros(embeddings.hidden.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(height // 2, width // 2, noisy.device, dtype),
            return_dict=False,
        )[0]  # fmt: skip
        return unpack(packed, channels, height, width)

    def spatial_latents(self, latents: Any, height: int, width: int, vae: Any) -> Any:
        factor = vae_factor(vae)
        return unpack(latents, latents.shape[-1] // 4, height // factor, width // factor)

    def conditioning_dim(self, denoiser: Any) -> int:
        return int(denoiser.config.joint_attention_dim)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """``pack`` reversed."""
    b = packed.shape[0]
    patches = packed.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, height, width)


def image_ids(rows: int, columns: int, device: Any, dtype: Any) -> torch.Tensor:
    """Each patch's (0, row, column): FluxPipeline._prepare_latent_image_ids."""
    import torch

    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


FLUX = Flux(
    name="flux",
    title="FLUX.1",
    pipelines={
        "txt2img": "FluxPipeline",
        "img2img": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
    },
    text_encoders=("text_encoder", "text_encoder_2"),
    text_encoder_classes=("CLIPTextModel", "T5EncoderModel"),
    tokenizers=("tokenizer", "tokenizer_2"),
    tokenizer_classes=("CLIPTokenizer", "T5TokenizerFast"),
    lora_text_encoders=("text_encoder",),
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    preview_scheduler="FlowMatchEulerDiscreteScheduler",
    embedding_keys=("clip_l", "t5"),
    # OneTrainer's names, which ComfyUI and Forge map to FLUX's fused BFL layers (and
    # diffusers reads for the attention layers).
    kohya_prefixes={"transformer": "lora_transformer_", "text_encoder": "lora_te1_"},
    kohya_module_names=True,
    default_guidance=3.5,  # FLUX.1-dev's
    max_text_tokens=MAX_SEQUENCE_LENGTH,
    schedulers=("default",),  # the model's flow-matching Euler (FluxPipeline passes sigmas)
    services=frozenset({"generator", "trainer"}),
)

# The tiny FLUX.1 (shared/NOTES.md): one double- and one single-stream block, a 4-channel VAE
# (so 16 packed channels), CLIP and T5 encoders of width 32; dev-like (guidance embedded).
TINY_FLUX = {
    "transformer": {
        "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8], "guidance_embeds": True,
    },
    "vae": {
        "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "latent_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 8, "mid_block_add_attention": False,
        "scaling_factor": 1.0, "shift_factor": 0.0,
    },
    "text_encoder": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 32,
    },
    "text_encoder_2": {
        "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8,
    },
    "t5_max_length": 32,
}  # fmt: skip


# FLUX.1-dev's shapes (the public config.json files of its transformer, VAE, CLIP-L and
# T5-XXL; the vocabularies are the tiny tokenizers'), for GPU benchmarks with random weights:
# 12B + 4.7B + 0.1B parameters, 34 GB in bf16.
FLUX_DEV = {
    "transformer": {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True,
    },
    "vae": {
        "sample_size": 1024, "in_channels": 3, "out_channels": 3,
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 16, "layers_per_block": 2,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "text_encoder": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "text_encoder_2": {
        "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
        "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu",
    },
    "t5_max_length": 512,
}  # fmt: skip


def build_tiny(seed: int = 0, architecture: dict[str, Any] = TINY_FLUX) -> Any:
    """A ``FluxPipeline`` with random weights (fixed seed) from the tiny configs, or another
    architecture's (``FLUX_DEV``)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from loraforge_core.tiny_tokenizers import t5_tokenizer, write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tiny_tokenizer(Path(tmp))
        clip_tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    t5_tok = t5_tokenizer(max_length=architecture["t5_max_length"])
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, **architecture["text_encoder"],
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), **architecture["text_encoder_2"], is_encoder_decoder=False,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    ))  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=AutoencoderKL(**architecture["vae"]),
        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(**architecture["transformer"]),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
