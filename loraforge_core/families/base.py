"""What every model family answers, and the shared parts of the answers.

A family is recognised from its folder's ``model_index.json`` (the pipeline class diffusers
saved it with). Its data says what it is made of (pipelines per mode, text encoders and
tokenizers, its denoiser, A1111/ComfyUI embedding keys, kohya prefixes); its methods do what
differs between families: LoRA targets, prompt encoding for training and serving, the
denoiser's inputs, sizes, and what an adapter must match to apply. The trainer, the
generator, the mixer, interop and the toy world call these and never branch on a family.

The methods take the family's own modules (a pipeline, a denoiser, tokenizers and encoders)
and import torch only when called, so a server that only reads a model's index stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class PromptEmbeddings:
    """What the denoiser is conditioned on for a batch of prompts, as training computes it."""

    hidden: torch.Tensor  # [B, tokens, conditioning dim]
    pooled: torch.Tensor | None = None  # [B, D]: a pooled embedding (SDXL, FLUX.1)


@dataclass(frozen=True)
class Family:
    name: str  # as operators and manifests spell it
    title: str  # for people
    # mode (txt2img, img2img, inpaint) -> diffusers class; model_index.json's "_class_name"
    # is one of them
    pipelines: dict[str, str]
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # transformers class of each text encoder, and of each tokenizer
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    tokenizer_classes: tuple[str, ...] = ("CLIPTokenizer",)
    # The text encoders LoRA adapts (those the family's diffusers loader reads LoRA for).
    lora_text_encoders: tuple[str, ...] | None = None  # None: all of them
    denoiser: str = "unet"  # the pipeline's attribute: "unet" or "transformer"
    # An A1111/ComfyUI embedding file's key per text encoder ("" : the one-tensor form).
    embedding_keys: tuple[str, ...] = ("",)
    # kohya/A1111 LoRA key prefix per component.
    kohya_prefixes: dict[str, str] = field(default_factory=dict)
    services: frozenset[str] = frozenset()  # "generator", "trainer"

    @property
    def components(self) -> tuple[str, ...]:
        """The modules LoRA can adapt: the denoiser, then the text encoders it adapts."""
        texts = self.text_encoders if self.lora_text_encoders is None else self.lora_text_encoders
        return (self.denoiser, *texts)

    # ------------------------------------------------------------------ LoRA
    def lora_targets(self, component: str, extended: bool = False) -> tuple[str, ...]:
        """The layers a LoRA on ``component`` adapts by default (peft's ``target_modules``);
        with ``extended``, the denoiser's extended ("LoCon") set too."""
        raise self._unsupported()

    def kohya_model_version(self, conditioning_dim: int) -> str:
        """kohya's ``ss_base_model_version`` for an adapter of this family."""
        raise self._unsupported()

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(
        self, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str],
        device: torch.device | str = "cpu",
    ) -> PromptEmbeddings:  # fmt: skip
        """The denoiser's conditioning for ``prompts`` as the family's pipeline computes it,
        through these encoders (a trainer's, whose LoRA and learned tokens are training)."""
        raise self._unsupported()

    def denoiser_inputs(self, embeddings: PromptEmbeddings, time_ids: Any = None) -> dict:
        """The denoiser's keyword arguments for a batch besides the latents and timesteps."""
        raise self._unsupported()

    def pipeline_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, num_images: int, guided: bool,
    ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """One request's prompt embeddings as the pipeline call's keyword arguments (the
        serving path encodes each request at its own text-encoder scales, then batches)."""
        raise self._unsupported()

    def classifier_free(self, pipe: Any, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` runs a negative half beside each image."""
        raise self._unsupported()

    # ------------------------------------------------------------------ shapes
    def default_size(self, pipe: Any) -> int:
        """The image side the model was trained at."""
        raise self._unsupported()

    def inpainting_base(self, pipe: Any) -> bool:
        """Whether the denoiser is an inpainting one (it takes the mask and masked image)."""
        return False

    def conditioning_dims(self, pipe: Any) -> tuple[int, int]:
        """(the first text encoder's width, the denoiser's text-conditioning width): what
        an adapter's manifest must match to apply to this model."""
        raise self._unsupported()

    def _unsupported(self) -> NotImplementedError:
        return NotImplementedError(f"loraforge does not run {self.title} models")


def encoder_widths(pipe: Any, family: Family) -> list[int]:
    """Each text encoder's token-embedding width, in the family's order."""
    return [int(getattr(pipe, name).get_input_embeddings().weight.shape[1])
            for name in family.text_encoders]  # fmt: skip
