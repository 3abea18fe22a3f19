"""Inpainting training (lora_pti's train_inpainting) on a 9-channel UNet, and serving its
adapter on that base: the UNet gets lora_pti's random holes and masked-image latents, and the
generator renders what stock diffusers' inpainting pipeline renders with the same file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core import toyworld
from loraforge_core.bundle import pack, read_bundle
from loraforge_core.errors import FailedPrecondition
from loraforge_core.models import load_pipeline, save_inpainting_model
from trainer_service.config import TrainingConfig
from trainer_service.training.data import InstanceExample
from trainer_service.training.trainer import RunPaths, Trainer

QUICK = dict(max_train_steps_ti=2, max_train_steps_tuning=4, save_steps=100, seed=0,
             placeholder_tokens=["<p1>"], initializer_tokens=["red"], device="cpu",
             gradient_accumulation_steps=1)  # fmt: skip
MASK = Image.new("L", (32, 32), 0)
MASK.paste(255, (8, 8, 24, 24))


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_inpainting_model(tmp_path_factory.mktemp("models") / "inpaint")


class RecordingTrainer(Trainer):
    """Keeps what the UNet is given: the latents and, for inpainting, the extra channels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[torch.Tensor] = []
        self.model.denoiser.register_forward_pre_hook(
            lambda module, args: self.inputs.append(args[0].detach().clone())
        )


def examples() -> list[InstanceExample]:
    return [InstanceExample(toyworld.render("purple", s), caption="a photo of a {}")
            for s in toyworld.BASE_SHAPES]  # fmt: skip


def train(model: Path, tmp_path: Path, **options) -> RecordingTrainer:
    config = TrainingConfig(pretrained_model_name_or_path=str(model), **{**QUICK, **options})
    return RecordingTrainer(config, examples(), RunPaths(tmp_path / "c", tmp_path / "a"))


def test_the_inpainting_unet_gets_random_holes_and_the_masked_image(inpainting_model, tmp_path):
    trainer = train(inpainting_model, tmp_path, train_inpainting=True)
    bundle = trainer.run()
    assert bundle is not None
    assert len(trainer.inputs) == 6
    holes_seen = []
    for given in trainer.inputs:
        assert given.shape[1] == 9  # noisy latents, the mask, the masked image's latents
        holes = given[:, 4]
        assert set(holes.unique().tolist()) <= {0.0, 1.0}
        holes_seen.append(holes.mean().item())
        assert given[:, 5:].abs().mean() > 0  # the masked image's latents
    assert len(set(holes_seen)) > 1  # each step draws its own holes
    trainer.data.config.train_inpainting = False  # what a plain batch would have been
    assert trainer.data.batch(torch.Generator().manual_seed(0)).conditioning is None

    # The generator on the same inpainting base serves the adapter like stock diffusers.
    engine = build_engine(load_pipeline(str(inpainting_model)), tmp_path / "g")
    engine.adapters.register("inp", data=pack(bundle.path))
    init = toyworld.render("green", "square")
    spec = GenerationSpec("a <p1> circle", width=32, height=32, steps=10, guidance_scale=5.0,
                          seed=1, adapters=[AdapterRequest("inp", 0.8)], init_image=init,
                          mask_image=MASK)  # fmt: skip
    ours = np.asarray(Image.open(io.BytesIO(engine.generate(spec)[0].data)), dtype=np.float32)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpainting_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    loaded = read_bundle(bundle.path)
    pipe.load_lora_weights(loaded.lora_path, adapter_name="inp")
    embeddings = loaded.embeddings()
    pipe.load_textual_inversion(list(embeddings.values()), token=list(embeddings))
    pipe.set_adapters(["inp"], [0.8])
    reference = pipe("a <p1> circle", image=init, mask_image=MASK, width=32, height=32,
                     num_inference_steps=10, guidance_scale=5.0,
                     generator=[torch.Generator().manual_seed(1)]).images[0]  # fmt: skip
    assert np.abs(ours - np.asarray(reference, dtype=np.float32)).mean() / 255 <= 1e-3
    with pytest.raises(FailedPrecondition, match="inpainting model"):
        engine.generate(GenerationSpec("a red circle", width=32, height=32, steps=2))


def test_the_method_must_fit_the_base_model(inpainting_model, tmp_path):
    with pytest.raises(ValueError, match="needs an inpainting base model"):
        train("", tmp_path, train_inpainting=True)
    with pytest.raises(ValueError, match="is an inpainting model"):
        train(inpainting_model, tmp_path)
