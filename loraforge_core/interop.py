"""Import and export of LoRA formats: kohya/A1111, diffusers/peft, cloneofsimo ``lora_diffusion``.

Our bundles hold peft-format keys (``unet.<module>.lora_A.weight``) with alpha folded into B.
Exports rename those keys; imports go through diffusers' own loaders where they exist
(diffusers/peft, kohya), then read the effective weights back out of the peft layers, so that
every per-module alpha and scale ends up folded into a plain bundle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loraforge_core import families
from loraforge_core.bundle import LORA_FILE, Bundle, Manifest, store_bundle
from loraforge_core.lora_format import FormatError, lora_pairs, lora_rank, pairs_state

# A1111's bundled embedding: one vector (SD), or one per text encoder (SDXL: clip_l, clip_g;
# FLUX.1: clip_l, t5).
KOHYA_EMBEDDING = re.compile(r"^bundle_emb\.(.+)\.(string_to_param\.\*|clip_l|clip_g|t5)$")
# Every key form diffusers' converters produce: peft (lora_A/B) and older diffusers names.
ANY_LORA_KEY = re.compile(
    r"^(unet|transformer|text_encoder(?:_2)?)\.(.+?)\.(?:lora_(A|B)|lora(?:_linear_layer)?\.(down|up))"
    r"\.weight$"
)
# diffusers' attention-processor form: <attention>.processor.to_k_lora.down.weight
PROCESSOR_KEY = re.compile(
    r"^(unet)\.(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)"
    r"\.weight$"
)
_SHAPE_ERROR = re.compile(
    r"copying a param with shape (torch\.Size\(\[[\d, ]+\]\)) from "
    r"checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]+\]\))"
)
CLONEOFSIMO_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
CLONEOFSIMO_UNET_TARGETS = ("CrossAttention", "Attention", "GEGLU")
CLONEOFSIMO_CLIP_TARGETS = ("CLIPAttention", "CLIPSdpaAttention")


class ArchitectureMismatch(ValueError):
    """A LoRA made for another model architecture."""


def _kohya_module(family: families.Family, component: str, module: str) -> str:
    # transformers 5.x's CLIPTextModel has no "text_model." level; kohya/A1111 names do.
    if component != family.denoiser and not module.startswith("text_model."):
        module = "text_model." + module
    return family.kohya_prefixes[component] + (
        module if family.kohya_dotted else module.replace(".", "_")
    )


def export_kohya(
    bundle: Bundle, *, bundle_embeddings: bool = False, name: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One file that A1111, ComfyUI and stock diffusers load (FLUX.1: ComfyUI and Forge):
    the family's kohya prefixes (``lora_unet_*``/``lora_te_*``...) with ``.alpha``; ``name``
    is its ``ss_output_name`` (default: the bundle id).

    With ``bundle_embeddings`` the learned tokens go in too, as A1111's
    ``bundle_emb.<token>.string_to_param.*``; diffusers then refuses the whole file (its
    kohya detection needs every key to start with ``lora_``), so that is on request only.
    A1111 cuts such a token at its first ``.``, so a dotted token is refused there.
    """
    if bundle_embeddings:
        dotted = [t for t in bundle.manifest.tokens if "." in t]
        if dotted:
            raise FormatError(
                f"A1111 cuts bundled tokens at their first '.': {dotted} would load under "
                "another name; export without bundled embeddings (they go beside the file)"
            )
    family = families.by_name(bundle.manifest.family)
    if not family.kohya_prefixes:
        raise FormatError(
            f"kohya export of {family.title} adapters is not supported yet; the bundle's "
            f"{LORA_FILE} is in diffusers' format, which {family.pipelines['txt2img']}."
            "load_lora_weights reads as it is"
        )
    version = family.kohya_model_version(bundle.manifest.cross_attention_dim)
    state: dict[str, torch.Tensor] = {}
    for (component, module), (down, up) in lora_pairs(bundle.lora_state_dict()).items():
        key = _kohya_module(family, component, module)
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = up.contiguous()
        # Alpha is folded into up already: alpha == rank means a multiplier of 1.
        state[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    for token, vectors in bundle.token_vectors().items() if bundle_embeddings else ():
        for key, vector in _embedding_file(family, token, vectors).items():
            name = "string_to_param.*" if key == token else key  # SD: A1111's one-vector form
            state[f"bundle_emb.{token}.{name}"] = vector
    manifest = bundle.manifest
    conv_ranks = [v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")
                  and v.ndim == 4]  # fmt: skip
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(manifest.rank),
        "ss_network_alpha": str(manifest.rank),
        "ss_base_model_version": version,
        # A1111 lists an SD 2.x LoRA with SD 2.x models only when "True".
        "ss_v2": str(version == "sd_v2"),
        "ss_sd_model_name": manifest.base_model,
        "ss_training_comment": f"loraforge {manifest.method}, tokens {manifest.tokens}",
        "ss_output_name": name or bundle.id,
        "ss_steps": str(manifest.global_step),
        "loraforge_bundle_id": bundle.id,
    }
    if conv_ranks:  # extended LoRA (LoCon): kohya records the convolutions' rank apart
        conv = str(max(conv_ranks))
        metadata["ss_network_args"] = json.dumps({"conv_dim": conv, "conv_alpha": conv})
    return state, metadata


def export_embeddings(bundle: Bundle) -> dict[str, dict[str, torch.Tensor]]:
    """One embedding file per learned token: ``{file stem: {token: [1, dim]}}``, or for SDXL
    ``{file stem: {"clip_l": [1, dim], "clip_g": [1, dim]}}`` (the family's embedding keys).

    The single key is the token itself: diffusers' ``load_textual_inversion`` registers that
    name; A1111 and ComfyUI read the one tensor whatever its key and name the embedding after
    the file (``my-tok.safetensors`` is typed ``my-tok`` in A1111, ``embedding:my-tok`` in
    ComfyUI). Stems are the token's letters, digits, ``_`` and ``-``, made unique.
    """
    family = families.by_name(bundle.manifest.family)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for token, vectors in bundle.token_vectors().items():
        base = re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token"
        stem, n = base, 1
        while stem.lower() in (s.lower() for s in files):  # case-insensitive filesystems
            n += 1
            stem = f"{base}-{n}"
        files[stem] = _embedding_file(family, token, vectors)
    return files


def _embedding_file(
    family: families.Family, token: str, vectors: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One token's embedding-file tensors: ``{token: [1, dim]}``, or one per text encoder
    under the family's keys."""
    keys = [token] if family.embedding_keys == ("",) else family.embedding_keys
    return {k: v.reshape(1, -1).contiguous() for k, v in zip(keys, vectors, strict=True)}


# ------------------------------------------------------------------------------ importing
def detect_format(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(CLONEOFSIMO_KEY.match(k) for k in keys):
        return "lora_diffusion"
    kohya = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_")
    if any(k.startswith(kohya) for k in keys):
        return "kohya"
    if any("lora" in k for k in keys):
        return "diffusers"
    raise FormatError("no LoRA keys in this file (every LoRA key names 'lora')")


def _linear_walk(model: torch.nn.Module, ancestor_classes: tuple[str, ...]) -> Iterator[str]:
    """cloneofsimo's module order: every Linear under each target-class module, in
    registration order of the ancestors (``model.modules()``), then of their children.

    A Linear that peft already wrapped (it has a ``base_layer``) counts as that Linear.
    """
    names = {module: name for name, module in model.named_modules()}
    for ancestor in model.modules():
        if type(ancestor).__name__ not in ancestor_classes:
            continue
        base = names[ancestor]
        wrapped: list[str] = []
        for child_name, child in ancestor.named_modules():
            if any(child_name.startswith(w + ".") for w in wrapped):
                continue
            is_wrapped = isinstance(getattr(child, "base_layer", None), torch.nn.Linear)
            if is_wrapped:
                wrapped.append(child_name)
            if is_wrapped or isinstance(child, torch.nn.Linear):
                yield f"{base}.{child_name}" if base else child_name


def cloneofsimo_to_diffusers(
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Positional ``unet:{i}:up|down`` pairs -> peft keys on this architecture; tokens apart."""
    pairs = {}
    tokens = {k: v for k, v in state.items() if not CLONEOFSIMO_KEY.match(k)}
    for component, model, default in (
        ("unet", unet, CLONEOFSIMO_UNET_TARGETS),
        ("text_encoder", text_encoder, CLONEOFSIMO_CLIP_TARGETS),
    ):
        count = sum(1 for k in state if k.startswith(f"{component}:") and k.endswith(":up"))
        if not count:
            continue
        targets = tuple(json.loads(metadata[component])) if component in metadata else default
        # Current class names of the targets cloneofsimo knew under older names.
        targets += ("Attention",) if "CrossAttention" in targets else ()
        targets += ("CLIPSdpaAttention",) if "CLIPAttention" in targets else ()
        modules = list(_linear_walk(model, targets))
        if len(modules) != count:
            raise ArchitectureMismatch(
                f"the file has {count} {component} LoRA layers, this model has {len(modules)} "
                f"Linear layers under {sorted(set(targets))}: another architecture"
            )
        for index, module in enumerate(modules):
            down, up = state[f"{component}:{index}:down"], state[f"{component}:{index}:up"]
            pairs[component, module] = (down.float(), up.float())
    return pairs_state(pairs), tokens


def _module_named(state: dict[str, torch.Tensor], family: families.Family) -> bool:
    """Whether every LoRA layer of a kohya file is named by the family's prefixes and module
    names (as ``kohya_by_module_names`` reads them); others, e.g. kohya sd-scripts' FLUX.1
    files in BFL's fused names (``lora_unet_double_blocks_0_img_attn_qkv``), are for
    diffusers' own converter."""
    prefixes = tuple(family.kohya_prefixes.values())
    return all(key.startswith(prefixes) for key in state if ".lora_down." in key)


def kohya_by_module_names(
    state: dict[str, torch.Tensor], pipe: Any, family: families.Family
) -> dict[str, torch.Tensor]:
    """kohya keys that are the model's own module names with ``_`` for ``.`` (FLUX.1's form
    that ComfyUI and Forge map: ``lora_transformer_transformer_blocks_0_attn_to_q``,
    ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``) -> native keys, each layer's
    alpha / rank folded into its up matrix, as kohya applies it."""
    names = {
        _kohya_module(family, component, name): (component, name)
        for component in family.components
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
    }  # fmt: skip
    pairs = {}
    for key in sorted({k.split(".", 1)[0] for k in state}):
        if key not in names:
            raise ArchitectureMismatch(
                f"{family.title} has no layer named {key!r}: the LoRA was made for another "
                "architecture"
            )
        try:
            down = state[f"{key}.lora_down.weight"].float()
            up = state[f"{key}.lora_up.weight"].float()
        except KeyError as err:
            raise FormatError(f"a LoRA layer without its down or up matrix: {key}") from err
        alpha = float(state.get(f"{key}.alpha", torch.tensor(down.shape[0])))
        pairs[names[key]] = (down, up * (alpha / down.shape[0]))
    return pairs_state(pairs)


def effective_lora(pipe: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """An adapter loaded into the pipeline's peft layers, read back with its scaling folded
    into B (so alpha == rank), in our bundle's key format."""
    pairs = {}
    for component in families.of_pipeline(pipe).components:
        model = getattr(pipe, component)
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or adapter_name not in lora_a:
                continue
            down = lora_a[adapter_name].weight.detach().float().cpu()
            up = module.lora_B[adapter_name].weight.detach().float().cpu()
            scale = float(module.scaling[adapter_name])
            pairs[component, name] = (down.clone(), (up * scale).clone())
    return pairs_state(pairs)


def check_shapes(pipe: Any, lora: dict[str, torch.Tensor]) -> None:
    """Refuse, naming the first mismatch, a LoRA whose shapes do not fit this model."""
    components = families.of_pipeline(pipe).components
    modules = {c: dict(getattr(pipe, c).named_modules()) for c in components}
    for key, value in lora.items():
        match = ANY_LORA_KEY.match(key)
        processor = PROCESSOR_KEY.match(key)
        if processor:
            component, attention, projection, old_side = processor.groups()
            suffix = "to_out.0" if projection == "to_out" else projection
            path, peft_side = f"{attention}.{suffix}", None
        elif match and value.ndim == 2:
            component, path, peft_side, old_side = match.groups()
        else:
            continue
        down = peft_side == "A" or old_side == "down"
        if component == "text_encoder":  # transformers 5.x: no "text_model." level there
            path = path.removeprefix("text_model.")
        module = modules.get(component, {}).get(path)
        if module is not None and hasattr(module, "base_layer"):
            module = module.base_layer
        if module is None or not hasattr(module, "in_features"):
            raise ArchitectureMismatch(
                f"{component} has no layer {path!r}: the LoRA was made for another architecture"
            )
        expected, actual = (
            (module.in_features, value.shape[1]) if down else (module.out_features, value.shape[0])
        )
        if expected != actual:
            raise ArchitectureMismatch(
                f"{component} layer {path} has {expected} features, the LoRA has {actual}: it "
                "was made for another architecture"
            )


def discard_adapter(pipe: Any, adapter_name: str) -> None:
    """Remove whatever part of an adapter got injected (a failed load never lingers)."""
    for name in families.of_pipeline(pipe).components:
        if adapter_name in (getattr(getattr(pipe, name), "peft_config", None) or {}):
            pipe.delete_adapters(adapter_name)
            return


def import_file(path: Path, pipe: Any, store: Path, *, base_model: str) -> Bundle:
    """Any supported LoRA .safetensors -> a bundle in ``store`` (via the base pipeline)."""
    from safetensors import safe_open

    try:
        state = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:
        raise FormatError(f"{path}: not a readable safetensors file ({err})") from err
    kind = detect_format(state)
    family = families.of_pipeline(pipe)
    vectors: dict[str, list[torch.Tensor]] = {}  # token -> its vector per text encoder
    denoiser = getattr(pipe, family.denoiser)
    if kind == "lora_diffusion":
        lora, tokens = cloneofsimo_to_diffusers(state, metadata, denoiser, pipe.text_encoder)
        vectors = {token: [vector] for token, vector in tokens.items()}
        check_shapes(pipe, lora)
        source: Any = lora
    elif kind == "kohya" and family.kohya_module_names and _module_named(state, family):
        vectors = _bundled_embeddings(state, family)
        source = kohya_by_module_names(state, pipe, family)
        check_shapes(pipe, source)
    else:
        vectors = _bundled_embeddings(state, family)
        # The file itself where nothing was taken out of it: diffusers reads the alpha that
        # its own trainers record in the file's metadata (lora_adapter_metadata) from there.
        source = state if vectors else str(path)
        try:
            read = pipe.lora_state_dict(dict(state), **family.converter_options(pipe))
            converted = read[0] if isinstance(read, tuple) else read  # SD's: (state, alphas)
        except (ValueError, KeyError) as err:
            raise FormatError(f"{path.name}: diffusers cannot read this LoRA ({err})") from err
        check_shapes(pipe, converted)
    name = "loraforge_import"
    try:
        pipe.load_lora_weights(source, adapter_name=name)
        lora = effective_lora(pipe, name)
    except (ValueError, RuntimeError, KeyError) as err:
        shapes = _SHAPE_ERROR.search(str(err))
        reason = (
            f"a layer of the LoRA has shape {shapes.group(1)} where this model needs "
            f"{shapes.group(2)}: it was made for another architecture"
            if shapes
            else str(err).splitlines()[0]
        )
        raise ArchitectureMismatch(f"cannot apply {path.name} to this model: {reason}") from err
    finally:
        discard_adapter(pipe, name)
    if not lora:
        raise FormatError(f"{path.name}: no LoRA layer of it matched this model")
    embeddings = _token_embeddings(pipe, family, vectors)
    hidden = pipe.text_encoder.config.hidden_size
    rank = lora_rank(lora)
    manifest = Manifest(
        base_model=base_model, method=f"import:{kind}", tokens=sorted(vectors),
        rank=rank,
        unet_target_modules=sorted({k.split(".lora_")[0].rsplit(".", 1)[-1]
                                    for k in lora if k.startswith(f"{family.denoiser}.")}),
        text_encoder_target_modules=sorted({k.split(".lora_")[0].rsplit(".", 1)[-1]
                                            for k in lora if k.startswith("text_encoder")}),
        global_step=0, text_hidden_size=int(hidden),
        cross_attention_dim=family.conditioning_dim(denoiser),
        family=family.name,
        training_config={"imported_from": path.name, "source_format": kind,
                         "source_metadata": metadata},
    )  # fmt: skip
    return store_bundle(store, lora, embeddings, manifest)


def _bundled_embeddings(
    state: dict[str, torch.Tensor], family: families.Family
) -> dict[str, list[torch.Tensor]]:
    """Take A1111's bundled embeddings out of a kohya state: token -> a vector per text
    encoder of the family (missing ones left out, for ``_token_embeddings`` to refuse)."""
    found: dict[str, dict[int, torch.Tensor]] = {}
    for key in list(state):
        match = KOHYA_EMBEDDING.match(key)
        if match:
            token, kind = match.groups()
            if kind != "string_to_param.*" and kind not in family.embedding_keys:
                raise ArchitectureMismatch(
                    f"token {token} is stored for {kind}, a text encoder {family.title} "
                    "does not have: it was made for another model family"
                )
            index = 0 if kind == "string_to_param.*" else family.embedding_keys.index(kind)
            found.setdefault(token, {})[index] = state.pop(key).reshape(-1)
    return {token: [by_index[i] for i in sorted(by_index)] for token, by_index in found.items()}


def _token_embeddings(
    pipe: Any, family: families.Family, vectors: dict[str, list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Imported tokens in the bundle's form (``Bundle.token_vectors``), each checked to have
    one vector as wide as each of the model's text encoders."""
    widths = [int(getattr(pipe, name).config.hidden_size) for name in family.text_encoders]
    tokens = sorted(vectors)
    for token in tokens:
        sizes = [vector.numel() for vector in vectors[token]]
        if sizes != widths:
            raise ArchitectureMismatch(
                f"token {token} has vectors of {sizes} dimensions; this model's text "
                f"encoders take {widths}"
            )
    if not tokens:
        return {}
    if family.embedding_keys == ("",):
        return {token: vectors[token][0].float() for token in tokens}
    return {key: torch.stack([vectors[token][i].float() for token in tokens])
            for i, key in enumerate(family.embedding_keys)}  # fmt: skip
