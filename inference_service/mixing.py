"""Every request's adapters in one pass per LoRA layer, at each request's own scales.

peft keeps every resident adapter's A and B factors in its LoRA layers, and its forward runs
one small matmul pair and a Python call per active adapter, at one fixed scale for the whole
batch. Here each LoRA layer's forward is replaced (``refresh`` re-types peft's layers) and
applies a plan that ``set`` builds once per batch from the factors, so the forward does the
same few operations whatever the number of adapters:

- **fused**: every row shares one set of adapters and weights, on a component that runs many
  times per set (the denoiser: steps x guidance): the set is merged into a copy of the base weight,
  ``W0 + sum_a w_a * scaling_a * B_a A_a``, and the forward is the base layer's own operation
  on it. The base weight never changes, so unfusing is free and exact; merging costs about
  one forward's weight traffic, once per change of set (kept while the set repeats).
- **stacked**: one set for every row on a component run once per set (the text encoder): the
  adapters' factors concatenated along the rank, weights and scalings folded into B, so the
  delta is one matmul pair: ``base(x) + (x A^T) B^T``.
- **gathered**: rows with different adapters or weights (a mixed batch): each row's factors
  gathered into ``[rows, rank, in]`` and ``[rows, out, rank]`` (padded to the largest row's
  rank sum), and the delta is one batched matmul pair, as Punica's BGMV does.

While a set applies, a layer with nothing to add stands aside for its base layer, and a fused
layer for a twin of its base layer that holds the merged weight: the model then makes the
module calls stock diffusers makes (the wrappers' own calls were about 1% of a small render);
``clear`` puts the LoRA layers back. Compiled components keep their layers (their graph).

The maths is peft's own (``scaling`` = alpha / r); only each adapter's used rank and layers
are computed (a rank-8 adapter in a rank-16 slot costs rank 8, and a slot's layers that its
adapter lacks cost nothing, except in a compiled component, whose graph must not change).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Weight = float | tuple[float, ...]  # one weight for every row of the batch, or one per row


def row_weights(per_sample: Sequence[float], repeats: int = 1) -> Weight:
    """An adapter's weight in a batch laid out as ``repeats`` copies of the samples (the two
    halves of classifier-free guidance): one number when every row has the same."""
    if len(set(per_sample)) == 1:
        return float(per_sample[0])
    return tuple(float(w) for w in per_sample) * repeats


@dataclass(frozen=True)
class Plan:
    """What one LoRA layer computes for the current set: ``kind`` is "fused" (``weight``),
    "stacked" or "gathered" (``down`` and ``up``, laid out for the layer type's forward)."""

    kind: str
    weight: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None


class _Mixed:
    """What a re-typed LoRA layer does: the base layer alone, the base operation on fused
    weights, or the base output plus the plan's delta (``_forward_fused``, ``_add_delta`` per
    type)."""

    mix_plan: Plan | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan, base = self.mix_plan, self.base_layer
        if plan is None:
            return base(x, *args, **kwargs)
        if plan.kind == "fused":
            return self._forward_fused(x, plan.weight)
        # The delta is added in place: the base output is this forward's own tensor, an
        # out-of-place add would copy it, and the base operation's backward does not need it.
        return self._add_delta(base(x), x, plan)


@functools.cache
def _layer_classes() -> dict[type, type]:
    """peft's LoRA layer types and the subclasses whose forward applies the mixer's plan."""
    from peft.tuners.lora import layer

    class MixedLinear(_Mixed, layer.Linear):
        def _forward_fused(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return F.linear(x, weight, self.base_layer.bias)

        def _add_delta(self, out: torch.Tensor, x: torch.Tensor, plan: Plan) -> torch.Tensor:
            if plan.kind == "stacked":
                delta = F.linear(x, plan.down)
                out.view(-1, out.shape[-1]).addmm_(delta.view(-1, delta.shape[-1]), plan.up.t())
                return out
            rows = plan.down.shape[0]  # gathered: down [rows, in, r], up [rows, r, out]
            delta = torch.bmm(x.reshape(rows, -1, x.shape[-1]), plan.down)
            out.view(rows, -1, out.shape[-1]).baddbmm_(delta, plan.up)
            return out

    class MixedConv2d(_Mixed, layer.Conv2d):
        def _forward_fused(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

        def _add_delta(self, out: torch.Tensor, x: torch.Tensor, plan: Plan) -> torch.Tensor:
            base = self.base_layer
            # gathered: a grouped convolution, one group per row with the row's own factors
            groups = x.shape[0] if plan.kind == "gathered" else 1
            inputs = x.reshape(1, -1, *x.shape[2:]) if groups > 1 else x
            delta = F.conv2d(
                inputs, plan.down, None, base.stride, base.padding, base.dilation, groups
            )
            delta = F.conv2d(delta, plan.up, groups=groups)
            return out.add_(delta.view(out.shape))

    return {layer.Linear: MixedLinear, layer.Conv2d: MixedConv2d}


class LoraMixer:
    """Owns how LoRA layers apply adapters: ``set(component, {peft name: weight})`` before a
    forward, ``clear()`` after."""

    def __init__(
        self, pipe: Any, components: Sequence[str], *, fuse: bool = True,
        compiled: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.pipe = pipe
        self.fuse = fuse
        # Components under torch.compile: a layer's plan appearing and vanishing with the
        # adapter set would change the graph, so there a slot's zero layers are applied too.
        self.compiled = frozenset(compiled)
        # The denoiser, then the text encoders. The denoiser's forward runs many times per
        # adapter set (steps x guidance), so merging a set that every row shares pays there.
        self.components = tuple(components)
        self.layers: dict[str, list[Any]] = {c: [] for c in self.components}
        self._places: dict[str, list[tuple[Any, str]]] = {c: [] for c in self.components}
        self._twins: dict[int, Any] = {}  # a layer's base layer holding its fused weight
        self.ranks: dict[str, int] = {}  # peft name -> rank in use, where less than the layer's
        self.holding: dict[str, set[int]] = {}  # peft name -> its layers, where fewer than all
        self.version = 0  # bumped when any adapter's factors change: built plans are stale
        self._built: dict[str, tuple[Any, list[Plan | None]]] = {}
        self._scratch: dict[int, torch.Tensor] = {}  # fused weights, one buffer per layer
        self.refresh()

    def refresh(self) -> None:
        """Take over LoRA layers that diffusers created since the last call."""
        self.clear()  # every layer in its place before the walk
        classes = _layer_classes()
        mixed = tuple(classes.values())
        for component in self.components:
            found, places = [], []
            for parent in getattr(self.pipe, component).modules():
                for name, module in parent.named_children():
                    if type(module) in classes:
                        module.__class__ = classes[type(module)]
                    if isinstance(module, mixed):
                        _refuse_unsupported(module)
                        found.append(module)
                        places.append((parent, name))
            self.layers[component], self._places[component] = found, places
        self._twins.clear()
        self.version += 1

    def adapter_changed(
        self, name: str, rank: int | None = None, layers: Sequence[Any] | None = None
    ) -> None:
        """An adapter's factors were written (``rank``: the rank it uses, where a slot is larger;
        ``layers``: the LoRA layers it has factors in, where a slot holds zeros in others) or
        dropped (no ``rank``)."""
        self.ranks.pop(name, None)
        self.holding.pop(name, None)
        if rank is not None:
            self.ranks[name] = rank
        if rank is not None and layers is not None:
            self.holding[name] = {id(layer) for layer in layers}
        self.version += 1

    def set(self, component: str, weights: dict[str, Weight]) -> None:
        weights = {n: w for n, w in weights.items() if not (isinstance(w, float) and w == 0.0)}
        fuse = self.fuse and component == self.components[0]
        key = (self.version, fuse, tuple(sorted(weights.items())))
        built = self._built.get(component)
        if built is None or built[0] != key:
            skip = component not in self.compiled
            plans = [self._plan(layer, weights, fuse, skip) for layer in self.layers[component]]
            self._built[component] = built = (key, plans)
        stand_aside = component not in self.compiled
        places = self._places[component]
        for layer, plan, (parent, name) in zip(self.layers[component], built[1], places,
                                               strict=True):  # fmt: skip
            object.__setattr__(layer, "mix_plan", plan)  # skips nn.Module's attribute checks
            if stand_aside:
                parent._modules[name] = self._stand_in(layer, plan)

    def clear(self) -> None:
        for component in self.components:
            for layer, (parent, name) in zip(self.layers[component], self._places[component],
                                             strict=True):  # fmt: skip
                object.__setattr__(layer, "mix_plan", None)
                parent._modules[name] = layer

    def _stand_in(self, layer: Any, plan: Plan | None) -> Any:
        """What computes ``layer`` under ``plan`` with the fewest calls: its base layer when it
        adds nothing, the base layer's twin on the merged weight when fused, else itself."""
        if plan is None:
            return layer.base_layer
        if plan.kind != "fused":
            return layer
        twin = self._twins.get(id(layer))
        if twin is None:  # the merged weight lives in the layer's one scratch buffer
            twin = self._twins[id(layer)] = copy.copy(layer.base_layer)
            merged = torch.nn.Parameter(plan.weight, requires_grad=False)
            twin._parameters = {**twin._parameters, "weight": merged}
        return twin

    # ------------------------------------------------------------------ plans
    @torch.no_grad()
    def _plan(
        self, layer: Any, weights: dict[str, Weight], fuse: bool, skip_unused: bool = True
    ) -> Plan | None:
        names = [n for n in weights if n in layer.lora_A and
                 (not skip_unused or self._holds(n, layer))]  # fmt: skip
        if not names:
            return None
        factors = [self._factors(layer, n) for n in names]
        per_row = [weights[n] for n in names]
        if all(isinstance(w, float) for w in per_row):
            down = torch.cat([d for d, _ in factors])
            up = torch.cat([u * w for (_, u), w in zip(factors, per_row, strict=True)], dim=1)
            if fuse:
                return Plan("fused", weight=self._merged_weight(layer, down, up))
            return Plan("stacked", down=down, up=up)
        return _gathered(factors, per_row)

    def _holds(self, name: str, layer: Any) -> bool:
        """Whether the adapter has factors in the layer (a slot's other layers hold zeros,
        which would cost a delta's work and add nothing)."""
        holding = self.holding.get(name)
        return holding is None or id(layer) in holding

    def _factors(self, layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, scaling * B) of one adapter in one layer, trimmed to the rank it uses, in the
        base weight's dtype."""
        rank = self.ranks.get(name, layer.r[name])
        dtype = layer.base_layer.weight.dtype
        down = layer.lora_A[name].weight[:rank].to(dtype)
        up = layer.lora_B[name].weight[:, :rank].to(dtype) * layer.scaling[name]
        return down, up

    def _merged_weight(self, layer: Any, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer.weight
        scratch = self._scratch.get(id(layer))
        if scratch is None:
            scratch = self._scratch[id(layer)] = torch.empty_like(base)
        # One rounding to the base dtype (addmm accumulates in float32 on GPUs).
        torch.addmm(base.flatten(1), up.flatten(1), down.flatten(1), out=scratch.view(
            base.shape[0], -1))  # fmt: skip
        return scratch


def _gathered(
    factors: list[tuple[torch.Tensor, torch.Tensor]], per_row: list[Weight]
) -> Plan | None:
    """Each row's own factors: its adapters' A concatenated along the rank and its weights
    folded into B, zero-padded to the largest row's rank sum."""
    rows = max(len(w) for w in per_row if isinstance(w, tuple))
    columns = [w if isinstance(w, tuple) else (w,) * rows for w in per_row]
    signatures = [tuple(column[row] for column in columns) for row in range(rows)]
    distinct = list(dict.fromkeys(signatures))
    rank_sum = max(
        sum(d.shape[0] for (d, _), w in zip(factors, sig, strict=True) if w != 0.0)
        for sig in distinct
    )
    if rank_sum == 0:
        return None
    down_shape, up_shape = factors[0][0].shape, factors[0][1].shape
    downs = factors[0][0].new_zeros(len(distinct), rank_sum, *down_shape[1:])
    ups = factors[0][1].new_zeros(len(distinct), up_shape[0], rank_sum, *up_shape[2:])
    for index, sig in enumerate(distinct):
        start = 0
        for (down, up), w in zip(factors, sig, strict=True):
            if w != 0.0:
                stop = start + down.shape[0]
                downs[index, start:stop] = down
                ups[index, :, start:stop] = up * w
                start = stop
    rows_of = torch.tensor([distinct.index(sig) for sig in signatures], device=downs.device)
    downs, ups = downs[rows_of], ups[rows_of]
    if downs.dim() == 3:  # Linear: laid out for bmm
        return Plan("gathered", down=downs.transpose(1, 2).contiguous(),
                    up=ups.transpose(1, 2).contiguous())  # fmt: skip
    # Conv2d: one group per row
    return Plan("gathered", down=downs.flatten(0, 1), up=ups.flatten(0, 1))


def _refuse_unsupported(layer: Any) -> None:
    variants = getattr(layer, "lora_variant", {})
    if variants:
        raise ValueError(
            f"adapter(s) {sorted(variants)} use a LoRA variant (such as DoRA) "
            "that this server does not apply"
        )
    base = layer.base_layer
    if isinstance(base, torch.nn.Conv2d) and (base.groups != 1 or base.dilation != (1, 1)):
        raise ValueError("LoRA on grouped or dilated convolutions is not supported")
    for name, up in layer.lora_B.items():
        if up.bias is not None:
            raise ValueError(f"adapter {name!r} has LoRA biases, which this server does not apply")
