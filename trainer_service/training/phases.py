"""The phase plan: what each phase trains, at which learning rates, on which schedule.

Phase 1 (textual inversion) trains the new tokens' embedding rows; phase 2 (tuning) trains
peft LoRA on the UNet (and every text encoder with ``train_text_encoder``), one learning rate
per parameter group. The step loops that run them are trainer.py's.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer_service.config import TrainingConfig
from trainer_service.training import lora


def scaled_lr(config: TrainingConfig, base: float, processes: int) -> float:
    """``base``, times the effective batch size with ``scale_lr`` (as lora_pti does)."""
    if not config.scale_lr:
        return base
    accumulation = config.gradient_accumulation_steps
    return base * accumulation * config.train_batch_size * processes


def schedule(
    optimizer: torch.optim.Optimizer, steps: int, name: str, warmup_steps: int, processes: int
) -> Any:
    """The schedule ``name`` over ``steps`` optimizer steps.

    accelerate advances a prepared scheduler once per process on every step, so the schedule
    is stretched by the process count (as diffusers' training scripts do).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps * processes,
        num_training_steps=max(steps, 1) * processes,
    )  # fmt: skip


def add_lora(
    config: TrainingConfig, targets: list[str], denoiser: torch.nn.Module,
    text_encoders: list[torch.nn.Module], processes: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """peft LoRA on ``targets`` of the denoiser (and on the text encoders given): the
    optimizer's parameter groups."""
    lora.add_denoiser_lora(denoiser, lora.lora_config(
        config.lora_rank, config.effective_alpha, targets, config.lora_dropout,
    ))  # fmt: skip
    if config.train_text_encoder:
        for text_encoder in text_encoders:
            lora.add_text_encoder_lora(text_encoder, lora.lora_config(
                config.lora_rank, config.effective_alpha, config.lora_clip_target_modules,
                config.lora_dropout,
            ))  # fmt: skip
    text_params = [p for encoder in text_encoders for p in lora.lora_parameters(encoder)]
    # LoRA weights train in fp32 whatever the frozen weights' dtype.
    for param in lora.lora_parameters(denoiser) + text_params:
        param.data = param.data.float()
    groups = [{"params": lora.lora_parameters(denoiser),
               "lr": scaled_lr(config, config.learning_rate_unet, processes)}]  # fmt: skip
    if config.train_text_encoder:
        groups.append(
            {"params": text_params, "lr": scaled_lr(config, config.learning_rate_text, processes)}
        )
    return groups
