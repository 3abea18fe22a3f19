"""Which layers a LoRA adapts: ``lora_pti``'s default targets and its extended ("LoCon") set,
matched by module name as peft matches ``target_modules``. One home for the trainer's
injection, the generator's pre-shaped slots and extraction."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# cloneofsimo/lora defaults: {"CrossAttention", "Attention", "GEGLU"} for the UNet, i.e. every
# Linear of the attention blocks and GEGLU's projection; "CLIPAttention" for the text encoder.
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
DEFAULT_CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# use_extended_lora (lora_pti's, "LoCon"): also every ResNet convolution and linear, the
# transformers' projections in and out, and the down/upsamplers' convolutions.
EXTENDED_UNET_TARGETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "proj_in",
                         "proj_out", "conv")  # fmt: skip


def matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule: the module's full name, or its last dotted parts, is a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def targeted_layers(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(name, base layer) of every Linear or Conv2d the targets select (the base layer under a
    peft LoRA wrapper, whose own children are not matched again)."""
    import torch

    found = []
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) and matches(name, targets):
            found.append((name, layer))
    return found
