"""The base model's parts as training uses them: loaded once, frozen, on the training device.

These modules are never replaced: a phase hands accelerate its own references to wrap (for
data parallelism), and everything that reads weights (checkpoints, bundles, previews) reads
these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from loraforge_core import families
from loraforge_core.models import resolve_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BaseModel:
    path: str
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    weight_dtype: torch.dtype  # of the frozen UNet; the VAE stays float32

    @classmethod
    def load(
        cls, name_or_path: str, accelerator: Accelerator, checkpointing: bool, *,
        revision: str = "", vae: str = "",
    ) -> BaseModel:  # fmt: skip
        """The model's parts (at ``revision`` of its hub repository, when given), with the VAE
        from ``vae`` (a hub id or folder of an ``AutoencoderKL``) instead of its own if set."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = resolve_model(name_or_path)
        families.require_served(path, "trainer")
        at = {"revision": revision or None}
        model = cls(
            path=path,
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **at),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **at),
            vae=AutoencoderKL.from_pretrained(vae) if vae
            else AutoencoderKL.from_pretrained(path, subfolder="vae", **at),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **at),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **at),
            weight_dtype=DTYPES.get(accelerator.mixed_precision, torch.float32),
        )  # fmt: skip
        for module in (model.text_encoder, model.vae, model.unet):
            module.requires_grad_(False)
        device = accelerator.device
        model.vae.to(device, dtype=torch.float32)
        model.unet.to(device, dtype=model.weight_dtype)
        model.text_encoder.to(device)
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
            model.text_encoder.gradient_checkpointing_enable()
        return model

    @property
    def native_resolution(self) -> int:
        return int(self.vae.config.sample_size)

    @property
    def size_step(self) -> int:
        """What image sides must be multiples of: the VAE's factor times the UNet's."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_inpainting(self, train_inpainting: bool) -> None:
        """Refuse a run whose method does not fit the UNet (4 latent channels, or 9 with an
        inpainting model's mask and masked image)."""
        channels = int(self.unet.config.in_channels)
        if train_inpainting and channels != 9:
            raise ValueError(
                f"train_inpainting needs an inpainting base model (a UNet with 9 input "
                f"channels); {self.path} has {channels}"
            )
        if not train_inpainting and channels == 9:
            raise ValueError(
                f"{self.path} is an inpainting model (a UNet with 9 input channels): set "
                "train_inpainting, or train on a text-to-image base"
            )

    def embedding_weight(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    @torch.no_grad()
    def render(self, prompt: str, resolution: int, seed: int, steps: int = 20) -> Any:
        """One image of ``prompt`` with the weights as they are now (a training preview); the
        modules' train/eval modes are left as they were."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=self.unet, scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        modes = self.unet.training, self.text_encoder.training
        self.unet.eval()
        self.text_encoder.eval()
        try:
            return pipe(
                prompt, height=resolution, width=resolution, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]  # fmt: skip
        finally:
            self.unet.train(modes[0])
            self.text_encoder.train(modes[1])


def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The text encoder's hidden states for prompts padded to the tokenizer's length."""
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)  # fmt: skip
    return text_encoder(ids)[0]
