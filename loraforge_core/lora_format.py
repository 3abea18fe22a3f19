"""The native LoRA format: how a bundle's ``pytorch_lora_weights.safetensors`` names its
tensors (docs/artifact-format.md). Training writes it, and interop, merging and serving read it,
through this module alone.

A key is ``<component>.<module path>.lora_A.weight`` (down) or ``....lora_B.weight`` (up), the
component the denoiser (``unet``, ``transformer``), ``text_encoder`` or ``text_encoder_2``:
peft's names under diffusers' prefixes, which a stock ``load_lora_weights`` reads first.
diffusers' files carry no alpha and its loaders take alpha == rank, so a trained alpha / rank
is folded into the up matrices: the loaded delta W equals the trained one for any alpha.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LORA_KEY = re.compile(r"^(unet|transformer|text_encoder(?:_2)?)\.(.+)\.lora_(A|B)\.weight$")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

# {(component, module path): (down, up)}
Pairs = dict[tuple[str, str], tuple["torch.Tensor", "torch.Tensor"]]


class FormatError(ValueError):
    """A file that cannot be read as a LoRA."""


def pack_lora(
    states: Mapping[str, Mapping[str, torch.Tensor]], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """{component: peft state (``<module>.lora_A.weight`` ...)} trained at ``alpha`` -> one
    state dict in the native format (float32, contiguous, alpha / rank folded into up)."""
    unknown = set(states) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"no LoRA component is called {sorted(unknown)}; one of {COMPONENTS}")
    scale = alpha / rank
    packed: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        for key, value in state.items():
            value = value * scale if "lora_B" in key else value
            packed[f"{component}.{key}"] = value.float().contiguous()
    return packed


def lora_pairs(state: Mapping[str, torch.Tensor]) -> Pairs:
    """A native-format state dict as {(component, module path): (down, up)}."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = LORA_KEY.match(key)
        if not match:
            raise FormatError(f"unexpected key {key!r} in a loraforge bundle")
        component, module, which = match.groups()
        pairs.setdefault((component, module), {})[which] = value
    half = [k for k, v in pairs.items() if len(v) != 2]
    if half:
        raise FormatError(f"a LoRA layer without its down or up matrix: {half[0]}")
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}


def pairs_state(pairs: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """{(component, module path): (down, up)} -> a native-format state dict (``lora_pairs``
    reversed; the tensors as they are)."""
    state = {}
    for (component, module), (down, up) in pairs.items():
        state[f"{component}.{module}.lora_A.weight"] = down
        state[f"{component}.{module}.lora_B.weight"] = up
    return state


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The largest rank of a native-format state dict's layers (its manifest's rank)."""
    return max(down.shape[0] for down, _ in lora_pairs(state).values())
