"""Pre-shaped adapter slots: load a LoRA by copying weights, not by rebuilding layers.

At start-up the pool injects ``count`` zero LoRAs of rank ``rank`` on the default targets (UNet
attention projections and GEGLU, CLIP attention) through diffusers, once. Loading an adapter
then copies its A and B matrices into a free slot's tensors in place (padded with zeros to the
slot's rank; a module the adapter lacks gets zeros), which skips peft's walk over the module
tree and keeps every tensor's identity, so a compiled UNet needs no recompilation. This is what
diffusers' hotswap does for the UNet, done for the text encoder too (diffusers refuses
``hotswap=True`` for text encoders). Adapters with other targets or a larger rank take the
general path (``load_lora_weights`` under their own name).
"""

from __future__ import annotations

from typing import Any

import torch

from inference_service.requests import RESERVED_TOKEN_PREFIX
from loraforge_core import families

Pairs = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targeted(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, Any]]:
    found = []
    for name, module in model.named_modules():
        linear = getattr(module, "base_layer", module)
        if (
            isinstance(linear, torch.nn.Linear)
            and name.endswith(targets)
            and any(name == t or name.endswith("." + t) for t in targets)
        ):
            found.append((name, linear))
    return found


class SlotPool:
    def __init__(self, pipe: Any, count: int, rank: int) -> None:
        self.pipe = pipe
        self.rank = rank
        self.owner: dict[str, str | None] = {}
        self.layers: dict[str, dict[tuple[str, str], Any]] = {}
        for index in range(count):
            self._create(f"slot-{index}")

    def _create(self, slot: str) -> None:
        zeros: dict[str, torch.Tensor] = {}
        modules: list[tuple[str, str]] = []
        for component in families.of_pipeline(self.pipe).components:
            targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
            for name, linear in _targeted(getattr(self.pipe, component), targets):
                zeros[f"{component}.{name}.lora_A.weight"] = torch.zeros(
                    self.rank, linear.in_features
                )
                zeros[f"{component}.{name}.lora_B.weight"] = torch.zeros(
                    linear.out_features, self.rank
                )
                modules.append((component, name))
        self.pipe.load_lora_weights(zeros, adapter_name=slot)
        layers = {}
        for component, name in modules:
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
                if down.shape[1] != down_weight.shape[1] or up.shape[0] != up_weight.shape[0]:
                    raise ValueError(
                        f"{key[0]} layer {key[1]} has {down_weight.shape[1]} inputs and "
                        f"{up_weight.shape[0]} outputs, the adapter {down.shape[1]} and "
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
