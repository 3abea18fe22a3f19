"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo, 2025): a single-stream DiT on 2x2 patches
of FLUX.1's latents, conditioned on the token states of a Qwen3 LLM (its second-to-last
layer, for the prompt in Qwen's chat template, padding dropped: each prompt keeps its own
length). Trained with flow matching; the transformer takes 1 - sigma as its time and returns
the velocity negated.

LoRA adapts the transformer only: diffusers' Z-Image loader reads no text-encoder LoRA and its
DreamBooth script trains none, and ComfyUI's loader the same. No pivotal tuning: the encoder
is an LLM that reads the prompt through a chat template, where a new token's single row is not
how users steer it (no Z-Image trainer we know of offers textual inversion); DreamBooth-LoRA
binds an existing rare word instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge_core.families.base import PromptEmbeddings
from loraforge_core.families.flow import FlowTransformer
from loraforge_core.families.flux import FLUX_DEV, TINY_FLUX

if TYPE_CHECKING:
    import torch

    from loraforge_core.families.objectives import Noised

# diffusers' train_dreambooth_lora_z_image.py default: the attention projections of every
# block (the main layers and both refiners); extended: the feed-forwards and modulations.
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
EXTENDED_TRANSFORMER_TARGETS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                "adaLN_modulation.0")  # fmt: skip
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default


@dataclass(frozen=True)
class ZImage(FlowTransformer):
    def lora_targets(self, component: str, extended: bool = False) -> tuple[str, ...]:
        return TRANSFORMER_TARGETS + (EXTENDED_TRANSFORMER_TARGETS if extended else ())

    def kohya_model_version(self, conditioning_dim: int) -> str:
        return "z_image"

    def encode_prompts(
        self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
        device: torch.device | str = "cpu",
    ) -> PromptEmbeddings:  # fmt: skip
        """The LLM's second-to-last hidden states for the prompts in the chat template, padded
        to one length with their masks (ZImagePipeline._encode_prompt keeps each unpadded)."""
        (tokenizer,), (encoder,) = tokenizers, text_encoders
        ids, mask = chat_ids(tokenizer, prompts, self.text_length(tokenizer), device)
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return PromptEmbeddings(hidden.hidden_states[-2], mask=mask)

    def pipeline_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, num_images: int, guided: bool,
        text_tokens: int = 0,
    ) -> dict[str, Any]:  # fmt: skip
        positive, negative = pipe.encode_prompt(
            prompt=prompt, device=pipe._execution_device, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
            max_sequence_length=text_tokens or self.text_length(pipe.tokenizer),
        )  # fmt: skip
        return {"prompt_embeds": positive * num_images,  # per-prompt tensors of their own lengths
                "negative_prompt_embeds": negative * num_images if guided else None}  # fmt: skip

    def batch_embeddings(self, parts: list[Any]) -> Any:
        """Requests' per-prompt tensor lists, one after another (ZImagePipeline's form);
        None stays None (unguided: no negative prompts)."""
        return None if parts[0] is None else [tensor for part in parts for tensor in part]

    def classifier_free(self, pipe: Any, guidance_scale: float) -> bool:
        return guidance_scale > 1  # ZImagePipeline.do_classifier_free_guidance

    def call_options(self, pipe: Any) -> dict[str, Any]:
        return {"max_sequence_length": self.text_length(pipe.tokenizer)}

    def predict(
        self, denoiser: Any, noised: Noised, embeddings: PromptEmbeddings, *,
        dtype: torch.dtype, time_ids: Any = None, conditioning: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        """The transformer on each image as a one-frame video with its own caption length,
        as ZImagePipeline calls it: time 1 - sigma, the velocity negated back."""
        import torch

        if conditioning is not None:
            raise ValueError("Z-Image inpainting models are not trained here")
        frames = list(noised.noisy.to(dtype).unsqueeze(2).unbind(0))
        captions = [h[m.bool()].to(dtype) for h, m in zip(embeddings.hidden, embeddings.mask,
                                                          strict=True)]  # fmt: skip
        time = ((1000 - noised.timesteps) / 1000).to(dtype)
        out = denoiser(frames, time, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def conditioning_dim(self, denoiser: Any) -> int:
        return int(denoiser.config.cap_feat_dim)


def chat_ids(tokenizer: Any, prompts: list[str], length: int, device: Any) -> tuple[Any, Any]:
    """Token ids and mask of the prompts in the chat template, as ZImagePipeline tokenizes."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True, enable_thinking=True)
        for p in prompts
    ]  # fmt: skip
    encoded = tokenizer(texts, padding="max_length", max_length=length,
                        truncation=True, return_tensors="pt")  # fmt: skip
    return encoded.input_ids.to(device), encoded.attention_mask.to(device).bool()


Z_IMAGE = ZImage(
    name="zimage",
    title="Z-Image",
    pipelines={
        "txt2img": "ZImagePipeline",
        "img2img": "ZImageImg2ImgPipeline",
        "inpaint": "ZImageInpaintPipeline",
    },
    text_encoders=("text_encoder",),
    text_encoder_classes=("Qwen3Model",),
    tokenizers=("tokenizer",),
    tokenizer_classes=("Qwen2Tokenizer",),
    lora_text_encoders=(),
    denoiser="transformer",
    denoiser_class="ZImageTransformer2DModel",
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    preview_scheduler="FlowMatchEulerDiscreteScheduler",
    # The export ComfyUI maps (its Lumina2 key map: diffusers' names under
    # "diffusion_model.", q/k/v into its fused qkv) and diffusers' converter reads; imports of
    # every published form (that, kohya's lora_unet_*, diffusers' own) go through the converter.
    kohya_prefixes={"transformer": "diffusion_model."},
    kohya_dotted=True,
    default_guidance=5.0,  # ZImagePipeline's (Turbo is run at 0, 8 steps)
    max_text_tokens=MAX_SEQUENCE_LENGTH,
    schedulers=("default",),
    methods=frozenset({"dreambooth_lora"}),
    services=frozenset({"generator", "trainer"}),
)

# A tiny Z-Image: two main layers and one of each refiner, 4 heads of 16; the tiny FLUX's VAE
# (4 latent channels); a Qwen3 of width 32.
TINY_Z_IMAGE = {
    "transformer": {
        "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 4, "dim": 64,
        "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "cap_feat_dim": 32,
        "axes_dims": [8, 4, 4], "axes_lens": [256, 64, 64],
    },
    "vae": TINY_FLUX["vae"],  # a 4-channel VAE
    "text_encoder": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 256,
    },
    "max_length": 48,
}  # fmt: skip


# Z-Image-Turbo's shapes (the public config.json files of its transformer, FLUX.1's VAE and
# Qwen3-4B; the vocabulary is the tiny tokenizer's), for GPU benchmarks with random weights:
# 6.2B + 4.0B parameters.
Z_IMAGE_TURBO = {
    "transformer": {
        "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840,
        "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
        "cap_feat_dim": 2560, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    },
    "vae": FLUX_DEV["vae"],  # Z-Image decodes with FLUX.1's VAE
    "text_encoder": {
        "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    },
    "max_length": 512,
}  # fmt: skip


def build_tiny(seed: int = 0, architecture: dict[str, Any] = TINY_Z_IMAGE) -> Any:
    """A ``ZImagePipeline`` with random weights (fixed seed) from the tiny configs, or another
    architecture's (``Z_IMAGE_TURBO``)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    from loraforge_core.tiny_tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer(max_length=architecture["max_length"])
    torch.manual_seed(seed)
    encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), **architecture["text_encoder"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))  # fmt: skip
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**architecture["vae"]), text_encoder=encoder, tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(**architecture["transformer"]),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
