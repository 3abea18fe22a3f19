"""Pre-shaped adapter slots: load a LoRA by copying weights, not by rebuilding layers.

At start-up the pool injects ``count`` zero LoRAs of rank ``rank`` on the default targets (UNet
attention projections and GEGLU, CLIP attention; with ``extended``, also the UNet's ResNet
convolutions and linears, as extended LoRA trains them) through diffusers, once. Loading an
adapter then copies its A and B matrices into a free slot's tensors in place (padded with zeros
to the slot's rank; a module the adapter lacks gets zeros, and the mixer skips it), which skips
peft's walk over the module tree and keeps every tensor's identity, so a compiled UNet needs no
recompilation. This is what diffusers' hotswap does for the UNet, done for the text encoder too
(diffusers refuses ``hotswap=True`` for text encoders). Adapters with other targets or a larger
rank take the general path (``load_lora_weights`` under their own name).
"""

from __future__ import annotations

from typing import Any

import torch

from inference_service.spec import RESERVED_TOKEN_PREFIX
from loraforge_core import families
from loraforge_core.lora_format import pairs_state
from loraforge_core.targets import targeted_layers

Pairs = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


class SlotPool:
    def __init__(self, pipe: Any, count: int, rank: int, *, extended: bool = False) -> None:
        self.pipe = pipe
        self.rank = rank
        self.extended = extended
        self.owner: dict[str, str | None] = {}
        self.layers: dict[str, dict[tuple[str, str], Any]] = {}
        for index in range(count):
            self._create(f"slot-{index}")

    def _create(self, slot: str) -> None:
        zeros = {}
        family = families.of_pipeline(self.pipe)
        for component in family.components:
            targets = family.lora_targets(component, self.extended)
            for name, layer in targeted_layers(getattr(self.pipe, component), targets):
                down, up = _factor_shapes(layer, self.rank)
                zeros[component, name] = (torch.zeros(down), torch.zeros(up))
        self.pipe.load_lora_weights(pairs_state(zeros), adapter_name=slot)
        layers = {}
        for component, name in zeros:
            layer = getattr(self.pipe, component).get_submodule(name)
            if layer.r[slot] != self.rank or layer.lora_alpha[slot] != self.rank:
                raise RuntimeError(f"slot {slot} was shaped with an unexpected rank or alpha")
            layers[(component, name)] = layer
        self.layers[slot] = layers
        self.owner[slot] = None

    def fits(self, pairs: Pairs) -> bool:
        """Whether every layer of the adapter has a slot layer of a large enough rank."""
        any_slot = next(iter(self.layers.values()), {})
        return all(
            key in any_slot and down.shape[0] <= self.rank for key, (down, _) in pairs.items()
        )

    def layers_for(self, slot: str, pairs: Pairs) -> list[Any]:
        """The slot's LoRA layers that hold the adapter's factors once filled (the rest zero)."""
        return [layer for key, layer in self.layers[slot].items() if key in pairs]

    def acquire(self, adapter_id: str) -> str | None:
        for slot, owner in self.owner.items():
            if owner is None:
                self.owner[slot] = adapter_id
                return slot
        return None

    def release(self, slot: str) -> None:
        self.owner[slot] = None

    def owns(self, peft_name: str) -> bool:
        return peft_name in self.owner

    @torch.no_grad()
    def fill(self, slot: str, pairs: Pairs) -> int:
        """Copy the adapter into the slot in place and return the rank it uses (the rest of
        the slot stays zero); on any error the slot is left all zeros."""
        try:
            for key, layer in self.layers[slot].items():
                down_weight = layer.lora_A[slot].weight
                up_weight = layer.lora_B[slot].weight
                down_weight.zero_()
                up_weight.zero_()
                if key not in pairs:
                    continue
                down, up = pairs[key]
                rank = down.shape[0]
                fits = (
                    down.shape[1:] == down_weight.shape[1:]  # inputs (and a conv's kernel)
                    and up.shape[0] == up_weight.shape[0]  # outputs
                    and up.shape[2:] == up_weight.shape[2:]
                )
                if not fits:
                    raise ValueError(
                        f"{key[0]} layer {key[1]} has {_shape(down_weight)} inputs and "
                        f"{up_weight.shape[0]} outputs, the adapter {_shape(down)} and "
                        f"{up.shape[0]}: it was made for another architecture"
                    )
                down_weight[:rank].copy_(down)
                up_weight[:, :rank].copy_(up)
        except BaseException:
            self.clear(slot)
            raise
        return max((down.shape[0] for down, _ in pairs.values()), default=0)

    @torch.no_grad()
    def clear(self, slot: str) -> None:
        for layer in self.layers[slot].values():
            layer.lora_A[slot].weight.zero_()
            layer.lora_B[slot].weight.zero_()


def _factor_shapes(layer: Any, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of peft's A and B weights for a rank-``rank`` LoRA on ``layer``: a Linear's
    matrices, or a Conv2d's kernel-sized A and 1x1 B."""
    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return (rank, layer.in_features), (layer.out_features, rank)


def _shape(down: torch.Tensor) -> str:
    """A factor's inputs as the error names them: channels and kernel for a convolution."""
    return str(down.shape[1]) if down.dim() == 2 else "x".join(map(str, down.shape[1:]))


class TokenPool:
    """Learned tokens live in the text encoder under private names while their adapter is
    resident; a request's prompt is rewritten to the private names of its own adapters' tokens.

    So activating an adapter's tokens costs a string replacement, not an embedding resize, and
    a token means nothing in a request that does not name its adapter. Freed names are reused;
    new ones are added in chunks to resize the embedding rarely.
    """

    PREFIX = RESERVED_TOKEN_PREFIX
    CHUNK = 16

    def __init__(self, pipe: Any) -> None:
        family = families.of_pipeline(pipe)
        # Each text encoder with its tokenizer; a token has one name in all of them.
        pairs = zip(family.tokenizers, family.text_encoders, strict=True)
        self.encoders = [(getattr(pipe, t), getattr(pipe, e)) for t, e in pairs]
        self.free: list[str] = []
        self.count = 0

    def _grow(self) -> None:
        names = [f"{self.PREFIX}{self.count + i}|>" for i in range(self.CHUNK)]
        self.count += self.CHUNK
        for tokenizer, encoder in self.encoders:
            tokenizer.add_tokens(names)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.free.extend(reversed(names))

    @torch.no_grad()
    def acquire(self, vectors: list[list[torch.Tensor]]) -> list[str]:
        """Private names for tokens given as their vectors, one per text encoder."""
        while len(self.free) < len(vectors):
            self._grow()
        names = [self.free.pop() for _ in vectors]
        for name, per_encoder in zip(names, vectors, strict=True):
            if len(per_encoder) != len(self.encoders):
                self.release(names)
                raise ValueError(
                    f"a learned token has vectors for {len(per_encoder)} text encoders, this "
                    f"model has {len(self.encoders)}"
                )
            for (tokenizer, encoder), vector in zip(self.encoders, per_encoder, strict=True):
                weight = encoder.get_input_embeddings().weight
                if vector.numel() != weight.shape[1]:
                    self.release(names)
                    raise ValueError(
                        f"a learned token has {vector.numel()} dimensions, this "
                        f"model's text encoder {weight.shape[1]}"
                    )
                weight[tokenizer.convert_tokens_to_ids(name)] = vector.reshape(-1).to(weight)
        return names

    def release(self, names: list[str]) -> None:
        self.free.extend(names)
