"""``loraforge-trainer merge`` and ``extract`` (trainer_service/merging.py): what each mode
renders, checked against the generator serving the original adapters."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_service.engine import GeneratorEngine, build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core.bundle import pack, read_bundle
from loraforge_core.lora_format import lora_pairs
from loraforge_core.models import load_pipeline
from trainer_service.cli import main as trainer_cli
from trainer_service.merging import merge_bundles
from trainer_service.training.lora import random_lora_bundle

PROMPT = "a <p> and a <q> circle"


@pytest.fixture(scope="module")
def bundles(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("merge-inputs")
    return [
        random_lora_bundle(str(tiny_model), root, seed=1, token="<p>", rank=4),
        random_lora_bundle(str(tiny_model), root, seed=2, token="<q>", rank=2),
    ]


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> GeneratorEngine:
    pipe = load_pipeline(str(tiny_model))
    return build_engine(pipe, tmp_path_factory.mktemp("merge-engine"), max_resident=4)


def render(engine: GeneratorEngine, adapters: list[tuple[str, float]]) -> np.ndarray:
    spec = GenerationSpec(PROMPT, width=32, height=32, steps=4, guidance_scale=5.0, seed=3,
                          adapters=[AdapterRequest(a, s) for a, s in adapters])  # fmt: skip
    (image,) = engine.generate(spec)
    return np.asarray(Image.open(io.BytesIO(image.data)), dtype=np.float32) / 255


def render_model(folder: Path) -> np.ndarray:
    """A diffusers model folder rendered by a stock pipeline (no adapter)."""
    pipe = load_pipeline(str(folder))
    image = pipe(PROMPT, width=32, height=32, num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(3)).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255


def register(engine: GeneratorEngine, name: str, path: Path) -> None:
    if name not in {e.adapter_id for e in engine.adapters.list()}:
        engine.adapters.register(name, data=pack(path))


def test_concat_renders_exactly_like_the_adapters_applied_together(bundles, engine, tmp_path):
    for name, bundle in zip(("p", "q"), bundles, strict=True):
        register(engine, name, bundle.path)
    output, renamed = merge_bundles([b.path for b in bundles], [0.7, -0.4], "concat", tmp_path)
    merged = read_bundle(output)
    assert renamed == {} and merged.manifest.tokens == ["<p>", "<q>"]
    assert merged.manifest.rank == 6  # 4 + 2 along the rank
    register(engine, "pq", merged.path)
    together = render(engine, [("p", 0.7), ("q", -0.4)])
    assert np.abs(render(engine, [("pq", 1.0)]) - together).mean() <= 1e-3
    assert np.abs(render(engine, [("p", 0.7)]) - together).mean() > 1e-2  # both really act


def test_sum_adds_the_factors_and_needs_the_same_ranks(bundles, tiny_model, tmp_path):
    twin = random_lora_bundle(str(tiny_model), tmp_path / "in", seed=5, token="<p>", rank=4)
    output, renamed = merge_bundles([bundles[0].path, twin.path], [0.5, 0.5], "sum", tmp_path)
    merged = lora_pairs(read_bundle(output).lora_state_dict())
    first, second = (lora_pairs(b.lora_state_dict()) for b in (bundles[0], twin))
    for key, (down, up) in merged.items():
        torch.testing.assert_close(down, 0.5 * first[key][0] + 0.5 * second[key][0])
        torch.testing.assert_close(up, 0.5 * first[key][1] + 0.5 * second[key][1])
    # The same token in both: the second is renamed, and the rename is reported.
    assert list(renamed.values()) == ["<p-2>"]
    assert read_bundle(output).manifest.tokens == ["<p-2>", "<p>"]
    with pytest.raises(ValueError, match="same layers and ranks"):
        merge_bundles([b.path for b in bundles], [0.5, 0.5], "sum", tmp_path)


def test_base_merge_and_extract_round_trip(bundles, engine, tiny_model, tmp_path, capsys):
    for name, bundle in zip(("p", "q"), bundles, strict=True):
        register(engine, name, bundle.path)
    together = render(engine, [("p", 0.7), ("q", 1.0)])
    tuned = tmp_path / "tuned"
    trainer_cli(["merge", str(bundles[0].path), str(bundles[1].path), "--mode", "base",
                 "--weights", "0.7", "1.0", "--model", str(tiny_model),
                 "-o", str(tuned)])  # fmt: skip
    assert capsys.readouterr().out.strip() == str(tuned)
    # The merged model, with no adapter, renders what the adapters rendered.
    assert np.abs(render_model(tuned) - together).mean() <= 1e-3

    # Extract it back: rank 6 holds both changes exactly (no clamp); the tokens come along.
    trainer_cli(["extract", "--tuned", str(tuned), "--base", str(tiny_model), "--rank", "6",
                 "--clamp-quantile", "1", "-o", str(tmp_path / "store")])  # fmt: skip
    path = Path(capsys.readouterr().out.split()[0])
    extracted = read_bundle(path)
    assert extracted.manifest.tokens == ["<p>", "<q>"] and extracted.manifest.method == "extract"
    register(engine, "extracted", path)
    assert np.abs(render(engine, [("extracted", 1.0)]) - together).mean() <= 1e-3
    # A lower rank with the default clamp is an approximation, still nearer than the base.
    trainer_cli(["extract", "--tuned", str(tuned), "--base", str(tiny_model), "--rank", "2",
                 "-o", str(tmp_path / "store")])  # fmt: skip
    register(engine, "rank2", Path(capsys.readouterr().out.split()[0]))
    error = np.abs(render(engine, [("rank2", 1.0)]) - together).mean()
    assert error < np.abs(render(engine, [("p", 0.0)]) - together).mean()


def test_bad_merges_say_what_to_fix(bundles, tmp_path, capsys):
    with pytest.raises(SystemExit):
        trainer_cli(["merge", str(bundles[0].path), "--weights", "1", "2", "-o", str(tmp_path)])
    assert "1 bundles need 1 weights, got 2" in capsys.readouterr().err
