"""Model configs: the tiny offline model, and public SD architectures for random-init benchmarks.

Values for SD 1.5 and SD 2.1-base are those of the public models' config.json files; building
them gives random weights with the real shapes (no download), for GPU timing only.
"""

from __future__ import annotations

from typing import Any

# Words the tiny tokenizer merges into single tokens (the rest is spelt byte by byte).
TINY_VOCAB_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "rendering",
    "painting", "style", "white", "background", "red", "green", "blue", "yellow", "purple",
    "orange", "black", "circle", "square", "triangle", "star", "cross", "small", "large",
    "dog", "cat", "toy", "object", "sks",
)  # fmt: skip

TINY_SAMPLE_SIZE = 32  # pixels; the VAE downsamples by 2

TINY = {
    "unet": {
        "sample_size": TINY_SAMPLE_SIZE // 2,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
    "vae": {
        "sample_size": TINY_SAMPLE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [16, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    },
    # Zero terminal SNR, v-prediction and trailing spacing: the settings under which a tiny
    # model learns colours from text (shared/NOTES.md); trainers must honour them.
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    },
}

# A tiny SDXL: two text encoders (the second with a projection, whose pooled output and the
# six size and crop numbers condition the UNet), the same small UNet and VAE as TINY.
_TINY_TEXT_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "max_position_embeddings": 77,
                      "projection_dim": 32}  # fmt: skip
TINY_SDXL = {
    "unet": {
        **TINY["unet"],
        "cross_attention_dim": 64,  # both encoders' hidden states side by side
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # time ids + pooled text
    },
    "vae": TINY["vae"],
    "text_encoder": {**_TINY_TEXT_ENCODER, "hidden_act": "quick_gelu"},
    "text_encoder_2": {**_TINY_TEXT_ENCODER, "hidden_act": "gelu"},
    "scheduler": TINY["scheduler"],
}

_SD_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "scaling_factor": 0.18215,
}

_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_SD_UNET_COMMON = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    ],
}  # fmt: skip

SD15 = {
    "unet": {**_SD_UNET_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768},
    "vae": _SD_VAE,
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "scheduler": _SD_SCHEDULER,
}

SD21_BASE = {
    "unet": {
        **_SD_UNET_COMMON,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "vae": _SD_VAE,
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 512,
    },
    "scheduler": _SD_SCHEDULER,
}

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's config.json files): CLIP ViT-L
# and OpenCLIP bigG, a 3-level UNet with 1/2/10 transformer layers, text_time conditioning.
SDXL_BASE = {
    "unet": {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": {**SD15["text_encoder"]},
    "text_encoder_2": {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
    "scheduler": _SD_SCHEDULER,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": TINY, "tiny-sdxl": TINY_SDXL, "sd15": SD15, "sd21-base": SD21_BASE,
    "sdxl-base": SDXL_BASE,
}  # fmt: skip
