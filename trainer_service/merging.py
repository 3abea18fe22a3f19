"""``loraforge-trainer merge`` and ``extract``: cloneofsimo/lora's ``lora_add`` and
``lora_distill`` on bundles.

A bundle's change to a layer is ``B @ A`` (alpha/rank is folded into B, artifact-format.md), so:

- **concat** (the seed's ``ljl``): A stacked along the rank, each bundle's B times its weight
  beside the others. The result renders exactly like the bundles applied together at those
  weights; its rank per layer is the sum of theirs.
- **sum** (the seed's ``lpl``): the weighted sum of the factors themselves, ``sum w_i A_i`` and
  ``sum w_i B_i``. Not the sum of the changes (cross terms appear); kept for the seed's users.
  Every bundle must have the same layers and ranks.
- **base** (the seed's ``upl``): the weighted changes merged into the base model's weights and
  the learned tokens added to its tokenizer; saved as a diffusers folder.
- **extract** (the seed's ``lora_distill``): the difference of a fine-tuned model from its base,
  per targeted layer, by truncated SVD to ``rank``, the factors clamped to the
  ``clamp_quantile`` of their values; tokens the tuned tokenizer adds become learned tokens.

Learned tokens travel with a merge; a token two bundles define is renamed in the later one
(``<tok>`` becomes ``<tok-2>``), and the renames are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge_core.bundle import Bundle, Manifest, read_bundle, store_bundle
from loraforge_core.lora_format import lora_pairs, lora_rank, pairs_state
from loraforge_core.targets import DEFAULT_CLIP_TARGETS, DEFAULT_UNET_TARGETS, targeted_layers

MODES = ("concat", "sum", "base")
Pairs = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Merged:
    pairs: Pairs
    tokens: dict[str, torch.Tensor]
    renamed: dict[str, str]  # "<tok>" of the n-th bundle -> its new name


def merge_factors(bundles: Sequence[Bundle], weights: Sequence[float], mode: str) -> Merged:
    """The merged factors and tokens of ``bundles`` ("concat" or "sum")."""
    if mode not in ("concat", "sum"):
        raise ValueError(f"mode must be concat or sum, not {mode!r}")
    if len(weights) != len(bundles):
        raise ValueError(f"{len(bundles)} bundles need {len(bundles)} weights, got {len(weights)}")
    all_pairs = [lora_pairs(b.lora_state_dict()) for b in bundles]
    merged: Pairs = {}
    if mode == "sum":
        _check_same_layers(all_pairs, bundles)
        for key in all_pairs[0]:
            merged[key] = (
                sum(w * p[key][0].float() for w, p in zip(weights, all_pairs, strict=True)),
                sum(w * p[key][1].float() for w, p in zip(weights, all_pairs, strict=True)),
            )
    else:
        for key in dict.fromkeys(k for pairs in all_pairs for k in pairs):
            present = [(w, p[key]) for w, p in zip(weights, all_pairs, strict=True) if key in p]
            merged[key] = (
                torch.cat([down.float() for _, (down, _) in present]),
                torch.cat([w * up.float() for w, (_, up) in present], dim=1),
            )
    tokens, renamed = _merge_tokens(bundles)
    return Merged(merged, tokens, renamed)


def _check_same_layers(all_pairs: list[Pairs], bundles: Sequence[Bundle]) -> None:
    first = {k: v[0].shape for k, v in all_pairs[0].items()}
    for bundle, pairs in zip(bundles[1:], all_pairs[1:], strict=True):
        other = {k: v[0].shape for k, v in pairs.items()}
        if other != first:
            raise ValueError(
                f"sum needs the same layers and ranks in every bundle; {bundle.path.name} "
                "differs from the first (use --mode concat)"
            )


def _merge_tokens(bundles: Sequence[Bundle]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tokens: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for bundle in bundles:
        for token, vector in bundle.embeddings().items():
            name, n = token, 1
            while name in tokens:
                n += 1
                name = f"{token[:-1]}-{n}>"
            if name != token:
                renamed[f"{bundle.id}:{token}"] = name
            tokens[name] = vector.float()
    return tokens, renamed


def write_merged(store: Path, bundles: Sequence[Bundle], merged: Merged, mode: str) -> Bundle:
    first = bundles[0].manifest
    state = {k: v.contiguous() for k, v in pairs_state(merged.pairs).items()}
    rank = lora_rank(state)
    manifest = Manifest(
        base_model=first.base_model, method=f"merge:{mode}", tokens=sorted(merged.tokens),
        rank=rank,
        unet_target_modules=sorted({m for b in bundles for m in b.manifest.unet_target_modules}),
        text_encoder_target_modules=sorted(
            {m for b in bundles for m in b.manifest.text_encoder_target_modules}
        ),
        global_step=0, text_hidden_size=first.text_hidden_size,
        cross_attention_dim=first.cross_attention_dim,
        training_config={"merged_from": [b.id for b in bundles], "renamed_tokens": merged.renamed},
        base_model_revision=first.base_model_revision,
    )  # fmt: skip
    return store_bundle(store, state, merged.tokens, manifest)


def merge_bundles(
    paths: Sequence[Path], weights: Sequence[float], mode: str, output: Path, model: str = ""
) -> tuple[Path, dict[str, str]]:
    """Merge bundles; returns the output (a bundle in the store ``output``, or for "base" a
    diffusers model folder) and the tokens renamed on collision."""
    bundles = [read_bundle(Path(p)) for p in paths]
    _check_compatible(bundles)
    if mode == "base":
        tokens, renamed = _merge_tokens(bundles)
        merge_into_base(model or bundles[0].manifest.base_model, bundles, weights, tokens, output)
        return output, renamed
    merged = merge_factors(bundles, weights, mode)
    return write_merged(output, bundles, merged, mode).path, merged.renamed


def _check_compatible(bundles: Sequence[Bundle]) -> None:
    if not bundles:
        raise ValueError("give at least one bundle")
    shapes = {(b.manifest.text_hidden_size, b.manifest.cross_attention_dim) for b in bundles}
    if len(shapes) > 1:
        raise ValueError("the bundles were trained for different architectures")


@torch.no_grad()
def merge_into_base(
    model: str, bundles: Sequence[Bundle], weights: Sequence[float],
    tokens: dict[str, torch.Tensor], output: Path,
) -> None:  # fmt: skip
    """``W0 + sum w_i B_i A_i`` written into the base model's weights; tokens added."""
    from loraforge_core.models import load_pipeline

    if len(weights) != len(bundles):
        raise ValueError(f"{len(bundles)} bundles need {len(bundles)} weights, got {len(weights)}")
    pipe = load_pipeline(model)
    for bundle, weight in zip(bundles, weights, strict=True):
        for (component, module), (down, up) in lora_pairs(bundle.lora_state_dict()).items():
            layer = _layer(pipe, component, module)
            delta = (up.float() @ down.float()) * weight
            layer.weight += delta.to(layer.weight.dtype)
    if tokens:
        pipe.tokenizer.add_tokens(list(tokens))
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        embedding = pipe.text_encoder.get_input_embeddings().weight
        for token, vector in tokens.items():
            embedding[pipe.tokenizer.convert_tokens_to_ids(token)] = vector.to(embedding)
    pipe.save_pretrained(output)


def _layer(pipe: Any, component: str, module: str) -> torch.nn.Linear:
    layer = getattr(pipe, component).get_submodule(module)
    if not isinstance(layer, torch.nn.Linear):
        raise ValueError(f"{component} layer {module} is not a Linear layer of this model")
    return layer


@torch.no_grad()
def extract_lora(tuned: str, base: str, rank: int, clamp_quantile: float, output: Path) -> Bundle:
    """A bundle of rank ``rank`` approximating ``tuned`` - ``base`` on the default targets."""
    from loraforge_core.models import load_pipeline

    if not 1 <= rank <= 256:
        raise ValueError("rank must be in 1..256")
    if not 0 < clamp_quantile <= 1:
        raise ValueError("clamp quantile must be in (0, 1]")
    tuned_pipe, base_pipe = load_pipeline(tuned), load_pipeline(base)
    pairs = {}
    for component, targets in (
        ("unet", DEFAULT_UNET_TARGETS),
        ("text_encoder", DEFAULT_CLIP_TARGETS),
    ):
        base_layers = dict(targeted_layers(getattr(base_pipe, component), targets))
        for name, layer in targeted_layers(getattr(tuned_pipe, component), targets):
            if name not in base_layers or base_layers[name].weight.shape != layer.weight.shape:
                raise ValueError(f"{component} layer {name} differs in shape: not the same model")
            diff = layer.weight.float() - base_layers[name].weight.float()
            if not diff.any():
                continue
            up, down = _low_rank(diff, rank, clamp_quantile)
            pairs[component, name] = (down, up)
    if not pairs:
        raise ValueError("the tuned model's targeted layers equal the base model's")
    tokens = _new_tokens(tuned_pipe, base_pipe)
    state = pairs_state(pairs)
    made_rank = lora_rank(state)  # below ``rank`` where a difference has a lower one
    manifest = Manifest(
        base_model=base, method="extract", tokens=sorted(tokens), rank=made_rank,
        unet_target_modules=list(DEFAULT_UNET_TARGETS),
        text_encoder_target_modules=list(DEFAULT_CLIP_TARGETS), global_step=0,
        text_hidden_size=int(base_pipe.text_encoder.config.hidden_size),
        cross_attention_dim=int(base_pipe.unet.config.cross_attention_dim),
        training_config={"extracted_from": tuned, "clamp_quantile": clamp_quantile},
    )  # fmt: skip
    return store_bundle(output, state, tokens, manifest)


def _low_rank(diff: torch.Tensor, rank: int, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-``rank`` approximation of ``diff``, both clamped to
    +-the ``quantile`` of their values together, as lora_distill clamps outliers."""
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    rank = min(rank, s.numel())
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if quantile < 1:
        limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up.contiguous(), down.contiguous()


def _new_tokens(tuned: Any, base: Any) -> dict[str, torch.Tensor]:
    base_vocab = set(base.tokenizer.get_vocab())
    embedding = tuned.text_encoder.get_input_embeddings().weight
    return {
        token: embedding[index].float().clone()
        for token, index in tuned.tokenizer.get_vocab().items()
        if token not in base_vocab
    }
