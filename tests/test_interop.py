"""Interop: kohya/A1111, diffusers and cloneofsimo formats in and out, and architecture checks."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraforge_core import interop
from loraforge_core.architectures import TINY
from loraforge_core.bundle import read_bundle, store_bundle
from loraforge_core.lora_format import lora_pairs
from loraforge_core.models import build_pipeline
from tests.helpers import random_bundle

PROMPT = "a photo of a <k1>"


@pytest.fixture(scope="module")
def bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    return random_bundle(str(tiny_model), tmp_path_factory.mktemp("store"), seed=11, token="<k1>")


@pytest.fixture()
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=5,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def render_bundle(tiny_model: Path, folder: Path) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    b = read_bundle(folder)
    pipe.load_lora_weights(b.lora_path)
    pipe.load_textual_inversion(list(b.embeddings().values()), token=list(b.embeddings()))
    return render(pipe)


def run_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "trainer_service", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_then_import_round_trips_to_the_same_images(fmt, bundle, tiny_model, tmp_path):
    exported = tmp_path / f"{fmt}.safetensors"
    extra = ["--bundle-embeddings"] if fmt == "kohya" else []  # the tokens travel in the file
    run_cli("export", str(bundle.path), "--format", fmt, "-o", str(exported), *extra)
    out = run_cli("import", str(exported), "--model", str(tiny_model), "-o", str(tmp_path / "s"))
    imported = Path(out.split()[0])
    manifest = read_bundle(imported).manifest
    assert manifest.method == f"import:{fmt}" and manifest.rank == 4
    if fmt == "kohya":
        assert manifest.tokens == ["<k1>"]
    else:  # the plain diffusers file carries no tokens: add them for the comparison
        save_file(bundle.embeddings(), imported / "learned_embeds.safetensors")
    original = render_bundle(tiny_model, bundle.path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(imported / "pytorch_lora_weights.safetensors")
    pipe.load_textual_inversion(list(bundle.embeddings().values()), token=["<k1>"])
    assert np.abs(render(pipe) - original).mean() <= 1e-3


def test_kohya_export_loads_unmodified_in_stock_diffusers_like_the_bundle(
    bundle, tiny_model, pipe, tmp_path
):
    exported = tmp_path / "kohya.safetensors"
    written = run_cli("export", str(bundle.path), "--format", "kohya", "-o", str(exported))
    embeddings = tmp_path / "kohya-embeddings" / "k1.safetensors"
    assert written.split() == [str(exported), str(embeddings)]
    with safe_open(exported, "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_output_name"] == "kohya" and metadata["ss_v2"] == "False"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0") for k in keys)
    assert all(k.startswith("lora_") for k in keys)
    pipe.load_lora_weights(str(exported))  # the file as written
    pipe.load_textual_inversion(str(embeddings))  # the file names its token
    assert np.abs(render(pipe) - render_bundle(tiny_model, bundle.path)).mean() <= 1e-3


def test_kohya_export_bundles_the_tokens_only_on_request(bundle):
    state, _ = interop.export_kohya(bundle, bundle_embeddings=True)
    assert state["bundle_emb.<k1>.string_to_param.*"].shape == (1, 64)
    assert not any(k.startswith("bundle_emb.") for k in interop.export_kohya(bundle)[0])


def test_kohya_export_is_named_by_the_user_and_marks_sd2(bundle, tmp_path):
    run_cli(
        "export", str(bundle.path), "--format", "kohya", "-o", str(tmp_path / "x.safetensors"),
        "--name", "my-cat",
    )  # fmt: skip
    with safe_open(tmp_path / "x.safetensors", "pt") as handle:
        assert handle.metadata()["ss_output_name"] == "my-cat"
    sd2 = copy.copy(bundle)
    sd2.manifest = dataclasses.replace(bundle.manifest, cross_attention_dim=1024)
    metadata = interop.export_kohya(sd2)[1]
    assert metadata["ss_v2"] == "True" and metadata["ss_base_model_version"] == "sd_v2"


def test_bundled_tokens_that_a1111_would_cut_or_forge_would_skip(bundle, tmp_path):
    dotted = copy.copy(bundle)
    dotted.manifest = dataclasses.replace(bundle.manifest, tokens=["<my.tok>"])
    with pytest.raises(interop.FormatError, match=r"first '\.'"):
        interop.export_kohya(dotted, bundle_embeddings=True)
    assert interop.export_kohya(dotted)[0]  # beside the file, any token goes
    tokens = [f"<t{i}>" for i in range(13)]
    many = store_bundle(
        tmp_path, bundle.lora_state_dict(), {t: torch.zeros(64) for t in tokens},
        dataclasses.replace(bundle.manifest, tokens=tokens),
    ).path  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "trainer_service", "export", str(many), "--format", "kohya",
         "-o", str(tmp_path / "m.safetensors"), "--bundle-embeddings"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Forge skips" in result.stderr


def test_embedding_files_name_their_token_for_diffusers_a1111_and_comfyui(
    bundle, tiny_model, tmp_path
):
    out = run_cli("export", str(bundle.path), "--format", "embeddings-a1111", "-o", str(tmp_path))
    files = [Path(line) for line in out.split()]
    assert [f.name for f in files] == ["k1.safetensors"]
    state = load_file(files[0])
    assert list(state) == ["<k1>"] and state["<k1>"].shape == (1, 64)  # one tensor: A1111, Comfy
    other = copy.copy(bundle)
    other.embeddings = lambda: {"<k2>": torch.ones(64)}
    save_file(interop.export_embeddings(other)["k2"], tmp_path / "k2.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    for file in (files[0], tmp_path / "k2.safetensors"):  # no token=: each names its own
        pipe.load_textual_inversion(str(file))
    vocab = pipe.tokenizer.get_vocab()
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(embeddings[vocab["<k1>"]], bundle.embeddings()["<k1>"].reshape(-1))
    assert torch.equal(embeddings[vocab["<k2>"]], torch.ones(64))


def test_embedding_file_stems_stay_unique(bundle):
    twins = copy.copy(bundle)
    twins.embeddings = lambda: {"<a.b>": torch.zeros(64), "<ab>": torch.ones(64)}
    assert list(interop.export_embeddings(twins)) == ["ab", "ab-2"]


def cloneofsimo_file(bundle, pipe, path: Path) -> dict[str, torch.Tensor]:
    """Written as lora_diffusion.save_safeloras_with_embeds writes it: positional
    ``{model}:{i}:up|down`` in traversal order of the target classes, target lists and ranks in
    the metadata, embeddings under their token names."""
    pairs = lora_pairs(bundle.lora_state_dict())
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for component, model, targets in (
        ("unet", pipe.unet, ["CrossAttention", "Attention", "GEGLU"]),
        ("text_encoder", pipe.text_encoder, ["CLIPAttention"]),
    ):
        metadata[component] = json.dumps(targets)
        walk = list(interop._linear_walk(model, (*targets, "CLIPSdpaAttention")))
        for i, module in enumerate(walk):
            down, up = pairs[(component, module)]
            state[f"{component}:{i}:down"] = down.half()
            state[f"{component}:{i}:up"] = up.half()
            metadata[f"{component}:{i}:rank"] = str(down.shape[0])
    for token, embedding in bundle.embeddings().items():
        state[token] = embedding
    save_file(state, path, metadata=metadata)
    return state


def test_cloneofsimo_file_imports_with_the_same_delta_w(bundle, tiny_model, pipe, tmp_path):
    source = tmp_path / "lora_diffusion.safetensors"
    state = cloneofsimo_file(bundle, pipe, source)
    imported = interop.import_file(source, pipe, tmp_path / "store", base_model="tiny")
    assert imported.manifest.tokens == ["<k1>"]
    walk = list(interop._linear_walk(pipe.unet, ("Attention", "GEGLU")))
    pairs = lora_pairs(imported.lora_state_dict())
    for i, module in enumerate(walk):
        expected = state[f"unet:{i}:up"].float() @ state[f"unet:{i}:down"].float()
        down, up = pairs[("unet", module)]
        torch.testing.assert_close(up @ down, expected, atol=1e-5, rtol=1e-4)
    assert len(pairs) == len(lora_pairs(bundle.lora_state_dict()))


def test_lora_for_another_architecture_is_refused_clearly(tiny_model, pipe, tmp_path):
    other = copy.deepcopy(TINY)
    other["text_encoder"]["hidden_size"] = 32
    other["unet"]["cross_attention_dim"] = 32
    build_pipeline(other).save_pretrained(tmp_path / "other")
    foreign = random_bundle(str(tmp_path / "other"), tmp_path / "store", seed=1, token="<x>")
    state, metadata = interop.export_kohya(foreign)
    save_file(state, tmp_path / "foreign.safetensors", metadata=metadata)
    with pytest.raises(interop.ArchitectureMismatch, match=r"another architecture"):
        interop.import_file(tmp_path / "foreign.safetensors", pipe, tmp_path / "s", base_model="")
    assert not getattr(pipe.unet, "peft_config", None), "nothing left half-loaded"
