"""What every model family answers, and the shared parts of the answers.

A family is recognised from its folder's ``model_index.json`` (the pipeline class diffusers
saved it with). Its data says what it is made of (pipelines per mode, text encoders and
tokenizers, its denoiser, A1111/ComfyUI embedding keys, kohya prefixes); its methods do what
differs between families: LoRA targets, prompt encoding for training and serving, the
denoiser's inputs, sizes, and what an adapter must match to apply. The trainer, the
generator, the mixer, interop and the toy world call these and never branch on a family.
Training objectives live in objectives.py, shared by the families that train with them.

The methods take the family's own modules (a pipeline, a denoiser, tokenizers and encoders)
and import torch only when called, so a server that only reads a model's index stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loraforge_core.families.objectives import (
        FlowMatching,
        Noised,
        NoisePrediction,
        ObjectiveOptions,
    )

    Objective = NoisePrediction | FlowMatching


@dataclass
class PromptEmbeddings:
    """What the denoiser is conditioned on for a batch of prompts, as training computes it."""

    hidden: torch.Tensor  # [B, tokens, conditioning dim]
    pooled: torch.Tensor | None = None  # [B, D]: a pooled embedding (SDXL, FLUX.1)
    # [B, tokens]: which tokens are the prompt's, where each prompt keeps its own length
    # (Z-Image drops its LLM's padding); None: every token counts.
    mask: torch.Tensor | None = None


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
    # diffusers classes: the denoiser, its training scheduler, the scheduler previews use
    denoiser_class: str = "UNet2DConditionModel"
    training_scheduler: str = "DDPMScheduler"
    preview_scheduler: str = "DDIMScheduler"
    # An A1111/ComfyUI embedding file's key per text encoder ("" : the one-tensor form).
    embedding_keys: tuple[str, ...] = ("",)
    # kohya/A1111 LoRA key prefix per component; with ``kohya_module_names`` the rest of a
    # key is the module's own name, "." written "_" (FLUX.1 in ComfyUI and Forge), without,
    # diffusers' converter maps it (SD's SGM block names).
    kohya_prefixes: dict[str, str] = field(default_factory=dict)
    kohya_module_names: bool = False
    # Whether the exported keys keep the module names' dots: ComfyUI maps Z-Image LoRAs by
    # their diffusers names under "diffusion_model." (its Lumina2 key map), not kohya's "_".
    kohya_dotted: bool = False
    services: frozenset[str] = frozenset()  # "generator", "trainer"
    # Serving: the guidance scale a request that sets none gets, and the generator's
    # scheduler names (spec.SCHEDULERS) the family's pipelines run; None: all of them.
    default_guidance: float = 7.5
    schedulers: tuple[str, ...] | None = None
    # The most text tokens a request may ask its prompts be encoded to (FLUX.1's T5: 512);
    # 0: the length is the model's and fixed (CLIP's 77).
    max_text_tokens: int = 0
    # The training methods the family offers (trainer_service.config.METHODS).
    methods: frozenset[str] = frozenset({"pti", "dreambooth_lora"})

    @property
    def adapted_text_encoders(self) -> tuple[str, ...]:
        """The text encoders LoRA adapts, in the family's order."""
        return self.text_encoders if self.lora_text_encoders is None else self.lora_text_encoders

    @property
    def components(self) -> tuple[str, ...]:
        """The modules LoRA can adapt: the denoiser, then the text encoders it adapts."""
        return (self.denoiser, *self.adapted_text_encoders)

    # ------------------------------------------------------------------ LoRA
    def lora_targets(self, component: str, extended: bool = False) -> tuple[str, ...]:
        """The layers a LoRA on ``component`` adapts by default (peft's ``target_modules``);
        with ``extended``, the denoiser's extended ("LoCon") set too."""
        raise self._unsupported()

    def kohya_model_version(self, conditioning_dim: int) -> str:
        """kohya's ``ss_base_model_version`` for an adapter of this family."""
        raise self._unsupported()

    def converter_options(self, pipe: Any) -> dict[str, Any]:
        """Keyword arguments of the pipeline's ``lora_state_dict``, which converts the
        formats LoRAs of the family are published in to diffusers' keys."""
        return {}

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
        text_tokens: int = 0,
    ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """One request's prompt embeddings as the pipeline call's keyword arguments (the
        serving path encodes each request at its own text-encoder scales, then batches);
        ``text_tokens``: the length to encode to, up to ``max_text_tokens`` (0: the model's)."""
        raise self._unsupported()

    def batch_embeddings(self, parts: list[Any]) -> Any:
        """Several requests' values of one ``pipeline_embeddings`` argument as one batch's
        (tensors stacked on the batch dimension; None stays None)."""
        import torch

        return None if parts[0] is None else torch.cat(parts)

    def classifier_free(self, pipe: Any, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` runs a negative half beside each image."""
        raise self._unsupported()

    def call_options(self, pipe: Any) -> dict[str, Any]:
        """What a call of the family's stock pipeline needs, besides the prompt, to encode it
        as training and serving do (e.g. FLUX.1's T5 length: the pipeline's default is 512)."""
        return {}

    # ------------------------------------------------------------------ training
    def objective(self, scheduler: Any, options: ObjectiveOptions) -> Objective:
        """What training minimises, on the model's training ``scheduler``."""
        raise self._unsupported()

    def objective_refusal(self, options: ObjectiveOptions) -> tuple[str, str] | None:
        """(option, why) for a training option the family's objective cannot honour."""
        return None

    def predict(
        self, denoiser: Any, noised: Noised, embeddings: PromptEmbeddings, *,
        dtype: torch.dtype, time_ids: Any = None, conditioning: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        """The denoiser's output for a noised micro-batch, shaped like its latents. ``dtype``:
        its frozen weights' (accelerate's wrapper of it has none to read); ``conditioning``:
        an inpainting denoiser's mask and masked-image latents;
        ``guidance``: the scale a guidance-embedded model takes as an input."""
        raise self._unsupported()

    def spatial_latents(self, latents: Any, height: int, width: int, vae: Any) -> Any:
        """A pipeline's ``output_type="latent"`` output as [B, C, H, W] latents."""
        return latents

    # ------------------------------------------------------------------ shapes
    def native_resolution(self, denoiser: Any, vae: Any) -> int:
        """The image side the model was trained at (SD 1.5: 512, SDXL and FLUX.1: 1024)."""
        raise self._unsupported()

    def size_step(self, denoiser: Any, vae: Any) -> int:
        """What image sides must be multiples of."""
        raise self._unsupported()

    def inpainting_denoiser(self, denoiser: Any) -> bool:
        """Whether the denoiser is an inpainting one (it takes the mask and masked image)."""
        return False

    def conditioning_dim(self, denoiser: Any) -> int:
        """The width of the text conditioning the denoiser takes: with the first text
        encoder's width, what an adapter's manifest must match to apply to this model."""
        raise self._unsupported()

    def _unsupported(self) -> NotImplementedError:
        return NotImplementedError(f"loraforge does not run {self.title} models")
