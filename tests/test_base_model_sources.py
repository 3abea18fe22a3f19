"""Where training's base model comes from: a revision of a hub repository (read from a local
hub cache, offline: the real hub code path, no network), another VAE, and captions written for
other data (lora_pti's revision, pretrained_vae_name_or_path, placeholder_token_at_data)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel

from trainer_service.training.base_model import BaseModel
from trainer_service.training.captions import caption_for
from trainer_service.training.data import InstanceExample

ROOT = Path(__file__).resolve().parent.parent
REPO = "loraforge-test/tiny"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}


def hub_cache(root: Path, tiny_model: Path) -> Path:
    """A Hugging Face hub cache holding REPO at two commits: main is the tiny model, the
    branch v2 the same with its UNet's first convolution shifted by one."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    for branch, commit in COMMITS.items():
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_model, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with torch.no_grad():
        unet.conv_in.weight += 1
    unet.save_pretrained(repo / "snapshots" / COMMITS["v2"] / "unet")
    return root


def conv_in_sums(revisions: list[str], cache: Path) -> list[float]:
    """Load REPO at each of ``revisions`` with the trainer's loading code, in one fresh process
    (the hub library reads its offline switch and cache folder at import)."""
    script = (
        "import sys; from accelerate import Accelerator;"
        "from trainer_service.training.base_model import BaseModel;"
        "[print(float(BaseModel.load(sys.argv[1], Accelerator(cpu=True), False, revision=r)"
        ".denoiser.conv_in.weight.sum())) for r in sys.argv[2:]]"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, REPO, *revisions],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(line) for line in result.stdout.strip().splitlines()[-len(revisions) :]]


def test_a_revision_loads_that_snapshot_of_the_repository(tiny_model: Path, tmp_path: Path):
    cache = hub_cache(tmp_path / "hub", tiny_model)
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    expected = float(base.conv_in.weight.detach().sum())
    shift = base.conv_in.weight.numel()
    default, main, v2, v2_commit = conv_in_sums(["", "main", "v2", COMMITS["v2"]], cache)
    assert abs(default - expected) < 1e-3  # the default branch
    assert abs(main - expected) < 1e-3
    assert abs(v2 - (expected + shift)) < 1e-2
    assert abs(v2_commit - (expected + shift)) < 1e-2


def test_another_vae_replaces_the_models_own(tiny_model: Path, tmp_path: Path):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.5
    vae.save_pretrained(tmp_path / "vae")
    accelerator = Accelerator(cpu=True)
    own = BaseModel.load(str(tiny_model), accelerator, False)
    other = BaseModel.load(str(tiny_model), accelerator, False, vae=str(tmp_path / "vae"))
    torch.testing.assert_close(other.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)
    assert not torch.equal(own.vae.decoder.conv_out.bias, other.vae.decoder.conv_out.bias)
    torch.testing.assert_close(other.denoiser.conv_in.weight, own.denoiser.conv_in.weight)


def test_a_token_in_the_datas_captions_stands_for_the_placeholders():
    example = InstanceExample(None, "x.png", caption="a photo of sks dog, sks on grass")
    rng = random.Random(0)
    assert (
        caption_for(example, "none", ["<s1>", "<s2>"], rng, token_at_data="sks|<s1><s2>")
        == "a photo of <s1><s2> dog, <s1><s2> on grass"
    )
    assert caption_for(example, "none", ["<s1>"], rng) == "a photo of sks dog, sks on grass"
    assert example.caption == "a photo of sks dog, sks on grass"
