"""Per-request and per-sample LoRA weights, applied by one forward hook per LoRA layer.

peft keeps every resident adapter's A and B matrices in its LoRA layers; diffusers'
``set_adapters`` activates a set by walking the whole module tree and rewriting each layer's
scaling (milliseconds per request), and peft's mixed-batch forward (``adapter_names``) gives
each sample one adapter at that adapter's fixed scale. Neither serves a batch in which each
request names its own adapters at its own scales. So peft's own LoRA path stays switched off
and a hook on each LoRA layer adds

    output += sum over adapters a of  w_a * scaling_a * B_a(A_a(x))

where ``w_a`` is one number for the whole batch (a single request) or one number per row (a
mixed batch: only the runs of rows whose requests name ``a`` are computed, as slices, so no
gather or scatter copies). Activating a request's
adapters is then an assignment, and the maths is peft's own (``scaling`` = alpha / r).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class RowWeights:
    """An adapter's weights in a mixed batch: (start, stop, one weight per row) for each run
    of consecutive rows that use it (a request's images are consecutive rows)."""

    runs: tuple[tuple[int, int, torch.Tensor], ...]


Weight = float | RowWeights


def row_weights(
    per_sample: Sequence[float], repeats: int = 1, device: torch.device | str = "cpu"
) -> Weight:
    """An adapter's weight in a batch laid out as ``repeats`` copies of the samples (the two
    halves of classifier-free guidance): one number when every row has the same."""
    if len(set(per_sample)) == 1:
        return float(per_sample[0])
    values = list(per_sample) * repeats
    runs, start = [], None
    for row, value in enumerate([*values, 0.0]):
        if value != 0.0 and start is None:
            start = row
        elif value == 0.0 and start is not None:
            factors = torch.tensor(values[start:row], dtype=torch.float32, device=device)
            runs.append((start, row, factors))
            start = None
    return RowWeights(tuple(runs))


def _lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import layer

    return (layer.Linear, layer.Conv2d)


class LoraMixer:
    """Owns the hooks; ``weights[component]`` maps peft adapter names to their weights."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.weights: dict[str, dict[str, Weight]] = {c: {} for c in COMPONENTS}
        self._hooked: set[int] = set()
        self.refresh()

    def refresh(self) -> None:
        """Hook LoRA layers that diffusers created since the last call and switch peft's own
        LoRA path off in all of them (loading an adapter can switch it back on)."""
        types = _lora_layer_types()
        for component in COMPONENTS:
            for module in getattr(self.pipe, component).modules():
                if not isinstance(module, types):
                    continue
                variants = getattr(module, "lora_variant", {})
                if variants:
                    raise ValueError(
                        f"adapter(s) {sorted(variants)} use a LoRA variant (such as DoRA) "
                        "that this server does not apply"
                    )
                module.enable_adapters(False)
                if id(module) not in self._hooked:
                    module.register_forward_hook(self._hook_for(component))
                    self._hooked.add(id(module))

    def set(self, component: str, weights: dict[str, Weight]) -> None:
        self.weights[component] = {
            name: w for name, w in weights.items() if not (isinstance(w, float) and w == 0.0)
        }

    def clear(self) -> None:
        for component in COMPONENTS:
            self.weights[component] = {}

    def _hook_for(self, component: str):
        def hook(module, args, output):
            weights = self.weights[component]
            return _add_deltas(module, args[0], output, weights.items()) if weights else None

        return hook


def _add_deltas(
    module: Any, x: torch.Tensor, output: torch.Tensor, weights: Iterable[tuple[str, Weight]]
) -> torch.Tensor:
    for name, weight in weights:
        if name not in module.lora_A:
            continue
        down, up = module.lora_A[name], module.lora_B[name]
        scaling = module.scaling[name]
        inputs = x.to(down.weight.dtype)
        if isinstance(weight, RowWeights):
            if torch.is_grad_enabled():  # the slices below are added in place
                output = output.clone()
            shape = (-1,) + (1,) * (output.dim() - 1)
            for start, stop, factors in weight.runs:
                delta = up(down(inputs[start:stop])) * (factors.to(output).view(shape) * scaling)
                output[start:stop] += delta.to(output.dtype)
        else:
            output = output + (up(down(inputs)) * (weight * scaling)).to(output.dtype)
    return output
