from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from loraforge_core.architectures import ARCHITECTURES
from loraforge_core.models import (
    build_pipeline,
    default_model_path,
    random_tiny_model_path,
    resolve_model,
)


def _render(pipe: StableDiffusionPipeline, prompt: str = "a red circle") -> np.ndarray:
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images[0]


def test_tiny_model_round_trips_and_generates(tiny_model: Path) -> None:
    assert json.loads((tiny_model / "model_index.json").read_text())["unet"][1] == (
        "UNet2DConditionModel"
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = _render(pipe)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0
    # Same seed, same weights: the loaded model reproduces the in-memory build exactly.
    rebuilt = build_pipeline(seed=0)
    rebuilt.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_render(rebuilt), image, atol=1e-5)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_tiny_tokenizer_spells_prompts_and_keeps_words_whole(tiny_model: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    assert tokenizer.tokenize("a green triangle") == ["a</w>", "green</w>", "triangle</w>"]
    from loraforge_core.architectures import TINY_VOCAB_WORDS

    assert all(len(tokenizer.tokenize(word)) == 1 for word in TINY_VOCAB_WORDS)
    # Unknown words are spelt with byte symbols, never dropped.
    assert "".join(tokenizer.tokenize("zebra")).replace("</w>", "") == "zebra"
    assert tokenizer.add_tokens(["<s1>"]) == 1


def test_random_tiny_model_is_built_once_into_the_cache(isolated_cache: Path) -> None:
    first = random_tiny_model_path()
    assert first.is_relative_to(isolated_cache)
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert resolve_model("tiny-random") == str(first)
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert resolve_model("") == str(default_model_path()) == resolve_model("tiny")
    assert resolve_model("stabilityai/stable-diffusion-2-1-base") == (
        "stabilityai/stable-diffusion-2-1-base"
    )


@pytest.mark.parametrize("name", ["sd15", "sd21-base"])
def test_public_architectures_have_the_published_shapes(name: str) -> None:
    from diffusers import UNet2DConditionModel

    config = ARCHITECTURES[name]
    # Build on the meta device: shapes without allocating a billion parameters.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
    params = sum(p.numel() for p in unet.parameters())
    assert 855e6 < params < 870e6  # SD 1.5 and 2.1 UNets: ~860M parameters
    assert unet.config.cross_attention_dim == config["text_encoder"]["hidden_size"]
