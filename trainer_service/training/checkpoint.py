"""Training state for resume: one object, saved and loaded in one place.

A checkpoint holds what a resumed run needs to continue as the uninterrupted one would: the
step and phase, the seed, the learned token rows (per text encoder), the LoRA weights (per
component), the optimizer and LR schedule states and the torch RNG. It is written to a
temporary file, fsynced and renamed (``step-0000100.pt`` in the job's checkpoints folder), and
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

GLOB = "step-*.pt"


def checkpoint_path(folder: Path, global_step: int) -> Path:
    return folder / f"step-{global_step:07d}.pt"


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
        final = checkpoint_path(folder, self.global_step)
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
        found = sorted(folder.glob(GLOB))
        return found[-1] if found else None
