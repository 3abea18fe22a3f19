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

from loraforge_core import families, models
from loraforge_core.families import PromptEmbeddings
from loraforge_core.models import resolve_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def preload() -> None:
    """Import what a training job of every family the trainer serves resolves by name
    (``models.preload``), and the training utilities: the zygote's children start their job
    without importing, about 1 s of CPU a job."""
    import diffusers.optimization
    import diffusers.training_utils  # noqa: F401

    models.preload("trainer")


@dataclass
class BaseModel:
    path: str
    family: families.Family
    tokenizers: list[Any]  # one per text encoder, in the family's order
    text_encoders: list[Any]
    vae: Any
    denoiser: Any  # the family's: a UNet or a transformer
    noise_scheduler: Any  # the family's training scheduler (DDPM, flow matching)
    weight_dtype: torch.dtype  # of the frozen denoiser; the VAE stays float32
    # Where every part lives. Read once: a diffusers model's ``.device`` walks all its
    # parameters (5 ms a read on the tiny model, about 5% of a training step).
    device: torch.device

    @classmethod
    def load(
        cls, name_or_path: str, accelerator: Accelerator, checkpointing: bool, *,
        revision: str = "", vae: str = "",
    ) -> BaseModel:  # fmt: skip
        """The model's parts (at ``revision`` of its hub repository, when given), with the VAE
        from ``vae`` (a hub id or folder of an ``AutoencoderKL``) instead of its own if set."""
        import diffusers
        import transformers

        path = resolve_model(name_or_path)
        family = families.require_served(path, "trainer") or families.SD
        at = {"revision": revision or None}
        encoders = zip(family.text_encoders, family.text_encoder_classes, strict=True)
        tokenizers = zip(family.tokenizers, family.tokenizer_classes, strict=True)
        denoiser = getattr(diffusers, family.denoiser_class)
        scheduler = getattr(diffusers, family.training_scheduler)
        model = cls(
            path=path,
            family=family,
            tokenizers=[getattr(transformers, kind).from_pretrained(path, subfolder=name, **at)
                        for name, kind in tokenizers],
            text_encoders=[getattr(transformers, kind).from_pretrained(path, subfolder=name, **at)
                           for name, kind in encoders],
            vae=diffusers.AutoencoderKL.from_pretrained(vae) if vae
            else diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **at),
            denoiser=denoiser.from_pretrained(path, subfolder=family.denoiser, **at),
            noise_scheduler=scheduler.from_pretrained(path, subfolder="scheduler", **at),
            weight_dtype=DTYPES.get(accelerator.mixed_precision, torch.float32),
            device=accelerator.device,
        )  # fmt: skip
        for module in (*model.text_encoders, model.vae, model.denoiser):
            module.requires_grad_(False)
        device = model.device
        model.vae.to(device, dtype=torch.float32)
        model.denoiser.to(device, dtype=model.weight_dtype)
        for text_encoder in model.text_encoders:
            text_encoder.to(device)
            if checkpointing:
                text_encoder.gradient_checkpointing_enable()
        if checkpointing:
            model.denoiser.enable_gradient_checkpointing()
        return model

    @property
    def text_encoder(self) -> Any:
        """The first (SD's only) text encoder."""
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def lora_text_encoders(self) -> list[Any]:
        """The text encoders LoRA adapts (FLUX.1: CLIP-L, not T5), in the family's order."""
        names = self.family.adapted_text_encoders
        return [e for name, e in zip(self.family.text_encoders, self.text_encoders, strict=True)
                if name in names]  # fmt: skip

    def with_trained(self, trained: list[Any]) -> list[Any]:
        """Every text encoder, those LoRA adapts replaced by ``trained`` (accelerate's
        wrappers of them, in the same order; none: the encoders as they are)."""
        if not trained:
            return self.text_encoders
        wrappers = dict(zip(map(id, self.lora_text_encoders), trained, strict=True))
        return [wrappers.get(id(encoder), encoder) for encoder in self.text_encoders]

    @property
    def native_resolution(self) -> int:
        """The image side the denoiser was trained at (SD 1.5: 512, SDXL: 1024)."""
        return self.family.native_resolution(self.denoiser, self.vae)

    @property
    def size_step(self) -> int:
        """What image sides must be multiples of."""
        return self.family.size_step(self.denoiser, self.vae)

    def check_inpainting(self, train_inpainting: bool) -> None:
        """Refuse a run whose method does not fit the denoiser (an inpainting one takes the
        mask and the masked image too)."""
        inpainting = self.family.inpainting_denoiser(self.denoiser)
        channels = int(self.denoiser.config.in_channels)
        if train_inpainting and not inpainting:
            raise ValueError(
                f"train_inpainting needs an inpainting base model (a UNet with 9 input "
                f"channels); {self.path} has {channels}"
            )
        if not train_inpainting and inpainting:
            raise ValueError(
                f"{self.path} is an inpainting model (a UNet with 9 input channels): set "
                "train_inpainting, or train on a text-to-image base"
            )

    def embedding_weights(self) -> list[torch.Tensor]:
        """Each text encoder's token embedding matrix."""
        return [encoder.get_input_embeddings().weight for encoder in self.text_encoders]

    def encode(
        self, prompts: list[str], text_encoders: list[Any] | None = None
    ) -> PromptEmbeddings:
        """The denoiser's conditioning for ``prompts`` through ``text_encoders`` (every text
        encoder, some of them accelerate's wrappers; these by default)."""
        encoders = text_encoders or self.text_encoders
        return self.family.encode_prompts(self.tokenizers, encoders, prompts, self.device)

    def pipeline(self, scheduler: Any) -> Any:
        """The family's text-to-image pipeline around these very modules."""
        import diffusers

        cls = getattr(diffusers, self.family.pipelines["txt2img"])
        parts = {
            "vae": self.vae, self.family.denoiser: self.denoiser, "scheduler": scheduler,
            **dict(zip(self.family.text_encoders, self.text_encoders, strict=True)),
            **dict(zip(self.family.tokenizers, self.tokenizers, strict=True)),
        }  # fmt: skip
        if "safety_checker" in cls._optional_components:
            parts |= {"safety_checker": None, "feature_extractor": None,
                      "requires_safety_checker": False}  # fmt: skip
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def render(
        self, prompts: list[str], resolution: int, seeds: list[int], steps: int = 20,
        guidance: float | None = None,
    ) -> list[Any]:  # fmt: skip
        """An image of each prompt (``prompts[i]`` drawn from ``seeds[i]``, as it would be
        alone), in one batch, with the weights as they are now (previews, evaluations); the
        modules' train/eval modes are left as they were.

        The denoiser runs in its own dtype under autocast (the text encoders stay float32);
        the VAE decodes in float32, which SDXL's needs (fp16 overflows in it)."""
        import diffusers

        preview = getattr(diffusers, self.family.preview_scheduler)
        pipe = self.pipeline(preview.from_config(self.noise_scheduler.config))
        modules = [self.denoiser, *self.text_encoders]
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        mixed = self.weight_dtype != torch.float32
        try:
            with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=mixed):
                options = {} if guidance is None else {"guidance_scale": guidance}
                latents = pipe(
                    prompts, height=resolution, width=resolution, num_inference_steps=steps,
                    generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                    output_type="latent", **options,
                ).images  # fmt: skip
            latents = self.family.spatial_latents(latents, resolution, resolution, self.vae)
            return self.decode(latents)
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Any]:
        """Images of latents as the family's pipelines decode them, in float32."""
        from diffusers.image_processor import VaeImageProcessor

        config = self.vae.config
        latents = latents.float()
        if getattr(config, "latents_mean", None) and getattr(config, "latents_std", None):
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", 0) or 0)
        pixels = self.vae.decode(latents).sample
        return VaeImageProcessor().postprocess(pixels, output_type="pil")
