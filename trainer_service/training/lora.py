"""LoRA injection through peft, and export in diffusers' key format.

UNet: diffusers' ``add_adapter`` (peft underneath). Text encoder: ``peft.inject_adapter_in_model``
directly, because transformers 5.x's ``add_adapter`` demands peft >= 0.22 (see constraints.txt).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

ADAPTER = "default"


def lora_config(rank: int, alpha: float, targets: list[str], dropout: float) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
        init_lora_weights="gaussian",
    )  # fmt: skip


def add_unet_lora(unet: torch.nn.Module, config: LoraConfig) -> None:
    unet.add_adapter(config)


def add_text_encoder_lora(text_encoder: torch.nn.Module, config: LoraConfig) -> None:
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in module.named_parameters() if "lora_" in name]


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key format (lora_A / lora_B), for checkpoints."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def load_peft_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint has LoRA keys the model lacks: {unexpected[:3]}")


def diffusers_lora_state(
    unet_state: dict[str, torch.Tensor],
    text_encoder_state: dict[str, torch.Tensor] | None,
    rank: int,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """peft states -> one ``pytorch_lora_weights`` dict (``unet.`` / ``text_encoder.`` keys).

    Keys keep peft's ``lora_A`` / ``lora_B`` names (what ``load_lora_weights`` reads first).
    diffusers' files carry no alpha and loaders assume alpha == rank, so alpha/rank is folded
    into the B matrices: the loaded delta W equals the trained one for any alpha.
    """
    scale = alpha / rank
    packed: dict[str, torch.Tensor] = {}
    for prefix, state in (("unet", unet_state), ("text_encoder", text_encoder_state or {})):
        for key, value in state.items():
            value = value * scale if "lora_B" in key else value
            packed[f"{prefix}.{key}"] = value.float().contiguous()
    return packed
