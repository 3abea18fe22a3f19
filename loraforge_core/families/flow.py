"""What the flow-matching transformer families (FLUX.1, Z-Image) share: the flow-matching
objective, sizes from their VAE with latents in 2x2 patches, and a text length capped at
``max_text_tokens`` (their pipelines' 512)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge_core.families.base import Family
from loraforge_core.families.objectives import FlowMatching
from loraforge_core.families.sd import vae_factor

if TYPE_CHECKING:
    from loraforge_core.families.objectives import ObjectiveOptions


@dataclass(frozen=True)
class FlowTransformer(Family):
    def objective(self, scheduler: Any, options: ObjectiveOptions) -> FlowMatching:
        return FlowMatching(scheduler, options)

    def objective_refusal(self, options: ObjectiveOptions) -> tuple[str, str] | None:
        return FlowMatching.refusal(options)

    def native_resolution(self, denoiser: Any, vae: Any) -> int:
        return int(vae.config.sample_size)  # FLUX.1's VAE, Z-Image's too: 1024

    def size_step(self, denoiser: Any, vae: Any) -> int:
        return vae_factor(vae) * 2  # latents are packed in 2x2 patches

    def text_length(self, tokenizer: Any) -> int:
        """The length prompts are padded to: the tokenizer's, at most ``max_text_tokens``."""
        return min(int(tokenizer.model_max_length), self.max_text_tokens)
