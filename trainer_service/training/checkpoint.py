"""Checkpoints: the training state for resume (one object, saved and loaded in one place), and
the bundle each checkpoint (and the run's last step) publishes.

A checkpoint holds what a resumed run needs to continue as the uninterrupted one would: the
step and phase, the seed, the learned token rows (per text encoder), the LoRA weights (per
component), the optimizer and LR schedule states and the torch RNG. It is written to a
temporary file, fsynced and renamed (``step-0000100.pt`` in the job's checkpoints folder), and
loaded with ``weights_only=True``.

A bundle (loraforge_core.bundle) holds the LoRA in the native format, the learned tokens and a
manifest of how they were made; it is what the generator loads and the job's artifacts are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from loraforge_core.bundle import Bundle, Manifest, store_bundle
from loraforge_core.evaluation import Evaluation
from loraforge_core.lora_format import pack_lora
from trainer_service.config import TrainingConfig
from trainer_service.training import RESUME_STATES, checkpoint_name


@dataclass
class TrainingState:
    global_step: int
    phase: str  # inversion | tuning
    seed: int
    embeddings: list[torch.Tensor]  # per text encoder, the learned tokens' rows in order
    lora: dict[str, dict[str, torch.Tensor]]  # component (unet, text_encoder...) -> peft state
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    # The checkpoints' evaluations so far: {"artifact_id": ..., **Evaluation.to_dict()}
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / checkpoint_name(self.global_step)
        tmp = final.with_suffix(".tmp")
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        return final

    @classmethod
    def load(cls, path: Path) -> TrainingState:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "unet_lora" in state:  # written before SDXL: one text encoder
            state["lora"] = {"unet": state.pop("unet_lora"),
                             "text_encoder": state.pop("text_lora")}  # fmt: skip
            rows = state["embeddings"]
            state["embeddings"] = [rows] if rows.numel() else []
        return cls(**state)

    @staticmethod
    def latest(folder: Path) -> Path | None:
        found = sorted(folder.glob(RESUME_STATES))
        return found[-1] if found else None


def export_bundle(
    store: Path, config: TrainingConfig, model: Any, *, lora: dict[str, dict[str, torch.Tensor]],
    tokens: dict[str, torch.Tensor], global_step: int, seed: int, processes: int,
    evaluation: Evaluation | None = None,
) -> Bundle:  # fmt: skip
    """The bundle of the weights at ``global_step``: ``lora`` is each component's peft state,
    ``tokens`` the learned embeddings, ``model`` the run's frozen base (base_model.py)."""
    manifest = Manifest(
        base_model=config.pretrained_model_name_or_path or "loraforge/tiny",
        method=config.method,
        tokens=config.learned_tokens,
        rank=config.lora_rank,
        unet_target_modules=config.denoiser_lora_targets(model.family),
        text_encoder_target_modules=list(config.lora_clip_target_modules)
        if config.train_text_encoder else [],
        global_step=global_step,
        text_hidden_size=int(model.text_encoder.config.hidden_size),
        cross_attention_dim=model.family.conditioning_dim(model.denoiser),
        training_config={**config.to_dict(), "seed": seed,
                         "trained_alpha": config.effective_alpha, "num_processes": processes},
        base_model_revision=config.revision,
        family=model.family.name,
        evaluation=evaluation.to_dict() if evaluation else {},
    )  # fmt: skip
    packed = pack_lora(lora, config.lora_rank, config.effective_alpha)
    return store_bundle(store, packed, tokens, manifest)
