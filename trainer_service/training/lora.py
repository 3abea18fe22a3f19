"""LoRA injection through peft (exported in the native format: loraforge_core.lora_format).

Denoiser (UNet, transformer): diffusers' ``add_adapter`` (peft underneath). Text encoder:
``peft.inject_adapter_in_model`` directly, because transformers 5.x's ``add_adapter`` demands
peft >= 0.22 (see constraints.txt).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

from loraforge_core.lora_format import pack_lora

ADAPTER = "default"


def lora_config(rank: int, alpha: float, targets: list[str], dropout: float) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
        init_lora_weights="gaussian",
    )  # fmt: skip


def add_denoiser_lora(denoiser: torch.nn.Module, config: LoraConfig) -> None:
    denoiser.add_adapter(config)


def add_text_encoder_lora(text_encoder: torch.nn.Module, config: LoraConfig) -> None:
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)


@contextmanager
def scaled(modules: list[torch.nn.Module], scale: float) -> Iterator[None]:
    """Every peft LoRA layer of ``modules`` at ``scale`` times its trained strength, for the
    duration (an evaluation's renders); restored after."""
    layers = [layer for module in modules for layer in module.modules()
              if isinstance(getattr(layer, "scaling", None), dict)]  # fmt: skip
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.scaling[name] *= scale
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved, strict=True):
            layer.scaling.update(scaling)


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in module.named_parameters() if "lora_" in name]


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key format (lora_A / lora_B), for checkpoints; empty
    for a module without LoRA."""
    if not getattr(module, "peft_config", None):
        return {}
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def load_peft_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint has LoRA keys the model lacks: {unexpected[:3]}")


def random_lora_bundle(
    model: str,
    root,
    *,
    seed: int,
    token: str | None = None,
    text_encoder: bool = True,
    rank: int = 4,
    std: float = 0.15,
    extended: bool = False,
):
    """A real bundle (the family's default targets on its denoiser and text encoders) with
    random non-zero weights.

    Made with the same injection and export code as training, for serving tests and benchmarks
    where what the adapter has learned does not matter.
    """
    from loraforge_core import families
    from loraforge_core.bundle import Manifest, store_bundle
    from loraforge_core.models import load_pipeline

    pipe = load_pipeline(model)
    family = families.of_pipeline(pipe)
    torch.manual_seed(seed)
    denoiser = getattr(pipe, family.denoiser)
    denoiser_targets = list(family.lora_targets(family.denoiser, extended))
    add_denoiser_lora(denoiser, lora_config(rank, rank, denoiser_targets, 0.0))
    adapted = family.adapted_text_encoders if text_encoder else ()
    text_targets = list(family.lora_targets(adapted[0])) if adapted else []
    for name in adapted:
        add_text_encoder_lora(getattr(pipe, name), lora_config(rank, rank, text_targets, 0.0))
    modules = [denoiser, *(getattr(pipe, name) for name in adapted)]
    with torch.no_grad():
        for module in modules:
            for param in lora_parameters(module):
                param.normal_(0, std / max(1, (param.shape[-1] / 64) ** 0.5))
    states = dict(zip(family.components, map(peft_state, modules), strict=False))
    state = pack_lora(states, rank, rank)
    texts = [getattr(pipe, name) for name in family.text_encoders]
    vectors = [torch.randn(text.config.hidden_size) * 0.4 for text in texts] if token else []
    embeddings: dict[str, torch.Tensor] = {}
    if token and family.embedding_keys == ("",):
        embeddings = {token: vectors[0]}
    elif token:  # one row per token in each text encoder's matrix (Bundle.token_vectors)
        keys = family.embedding_keys
        embeddings = {k: v.reshape(1, -1) for k, v in zip(keys, vectors, strict=True)}
    manifest = Manifest(
        base_model=str(pipe.name_or_path), method="pti", tokens=[token] if token else [],
        rank=rank, unet_target_modules=denoiser_targets, text_encoder_target_modules=text_targets,
        global_step=0, text_hidden_size=int(pipe.text_encoder.config.hidden_size),
        cross_attention_dim=family.conditioning_dim(denoiser),
        family=family.name,
    )  # fmt: skip
    return store_bundle(root, state, embeddings, manifest)
