"""SDXL training on the tiny SDXL: PTI learns each token in both text encoders, then LoRA on the
UNet and both encoders, the UNet conditioned as SDXL's is (pooled text, each image's original
size and crop); the bundle renders in the generator as in stock diffusers; a stopped run
resumes to exactly the weights of an uninterrupted one; DreamBooth with prior preservation
draws its class images through the SDXL pipeline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core import toyworld
from loraforge_core.bundle import LORA_FILE, Bundle, pack
from loraforge_core.models import load_pipeline
from trainer_service.config import TrainingConfig
from trainer_service.events import CallbackReporter, Log, Progress
from trainer_service.training.data import InstanceExample
from trainer_service.training.trainer import RunPaths, StopRequested, Trainer

PROMPT, SEED, STEPS, GUIDANCE = "a photo of a <s1>", 3, 4, 5.0


def config(model: Path, **overrides) -> TrainingConfig:
    return TrainingConfig(**{
        "pretrained_model_name_or_path": str(model), "max_train_steps_ti": 3,
        "max_train_steps_tuning": 3, "save_steps": 2, "seed": 0, "device": "cpu",
        "train_text_encoder": True, "continue_inversion": True, "initializer_tokens": ["<zero>"],
        "learning_rate_ti": 5e-3, "learning_rate_unet": 1e-2, "learning_rate_text": 1e-2,
        **overrides,
    })  # fmt: skip


def examples() -> list[InstanceExample]:
    return [InstanceExample(toyworld.render("purple", shape), caption="a photo of a {}")
            for shape in ("circle", "star")]  # fmt: skip


def train(model: Path, folder: Path, **overrides) -> Bundle:
    bundle = Trainer(config(model, **overrides), examples(),
                     RunPaths(folder / "ckpt", folder / "art")).run()  # fmt: skip
    assert bundle is not None
    return bundle


@pytest.fixture(scope="module")
def trained(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return train(tiny_sdxl, tmp_path_factory.mktemp("sdxl-pti"))


def stock_render(model: Path, bundle: Bundle | None, scale: float) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if bundle is not None:
        pipe.load_lora_weights(str(bundle.path / LORA_FILE), adapter_name="a")
        pipe.set_adapters(["a"], [scale])
        stored = bundle.embeddings()
        for key, encoder, tokenizer in (
            ("clip_l", pipe.text_encoder, pipe.tokenizer),
            ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
        ):
            pipe.load_textual_inversion(
                stored[key], token=bundle.manifest.tokens, text_encoder=encoder,
                tokenizer=tokenizer,
            )  # fmt: skip
    image = pipe(
        PROMPT, num_inference_steps=STEPS, width=32, height=32, guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255


def test_pti_learns_each_token_in_both_encoders_and_serves_like_stock_diffusers(
    trained: Bundle, tiny_sdxl: Path, tmp_path: Path
) -> None:
    assert trained.manifest.family == "sdxl"
    stored = trained.embeddings()
    assert {key: list(value.shape) for key, value in stored.items()} == {
        "clip_l": [1, 32], "clip_g": [1, 32],
    }  # fmt: skip
    # Zero-initialised, both rows learned.
    assert stored["clip_l"].norm() > 0 and stored["clip_g"].norm() > 0
    prefixes = {key.split(".", 1)[0] for key in load_file(trained.lora_path)}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}

    engine = build_engine(load_pipeline(str(tiny_sdxl)), tmp_path / "gen")
    engine.adapters.register("trained", data=pack(trained.path))
    served = engine.generate(GenerationSpec(
        prompt=PROMPT, width=32, height=32, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
        adapters=[AdapterRequest("trained", 0.8)],
    ))  # fmt: skip
    ours = np.asarray(Image.open(io.BytesIO(served[0].data)), dtype=np.float32) / 255
    assert np.abs(ours - stock_render(tiny_sdxl, trained, 0.8)).mean() <= 1e-3
    # It learned, on the same prompt: the LoRA moves the image from its tokens' alone, and
    # the tokens move it from the base model's reading of the prompt.
    tokens_only = stock_render(tiny_sdxl, trained, 0.0)
    assert np.abs(ours - tokens_only).mean() > 1e-2
    assert np.abs(tokens_only - stock_render(tiny_sdxl, None, 0.0)).mean() > 1e-2


def test_training_encodes_prompts_as_the_sdxl_pipeline_does(tiny_sdxl: Path) -> None:
    from accelerate import Accelerator
    from diffusers import StableDiffusionXLPipeline

    from trainer_service.training.base_model import BaseModel

    prompts = ["a photo of a red circle", ""]
    model = BaseModel.load(str(tiny_sdxl), Accelerator(cpu=True), False)
    ours = model.encode(prompts)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden, hidden) and torch.equal(ours.pooled, pooled)


def recorded_time_ids(model: Path, folder: Path, image: Image.Image, **overrides) -> list:
    """The ``time_ids`` the UNet received over a one-step DreamBooth run on ``image``."""
    seen: list = []
    trainer = Trainer(
        config(model, method="dreambooth_lora", max_train_steps_ti=0, max_train_steps_tuning=1,
               random_flip=False, train_text_encoder=False, **overrides),
        [InstanceExample(image, caption="a photo of a sks shape")],
        RunPaths(folder / "ckpt", folder / "art"),
    )  # fmt: skip
    trainer.model.denoiser.register_forward_pre_hook(
        lambda _, args, kwargs: seen.extend(kwargs["added_cond_kwargs"]["time_ids"].tolist()),
        with_kwargs=True,
    )
    trainer.run()
    return seen


def test_the_unet_is_told_each_images_original_size_and_crop(tiny_sdxl, tmp_path) -> None:
    wide = toyworld.render("red", "circle").resize((64, 32))  # width, height
    # Square 32 px: resized to 64x32, cut 16 px in from the left.
    square = recorded_time_ids(tiny_sdxl, tmp_path / "a", wide, aspect_ratio_bucketing=False)
    assert square == [[32, 64, 0, 16, 32, 32]]
    # Its 2:1 bucket, 44x20 (32x32 pixels' worth): resized to 44x22, 1 px cut from the top.
    assert recorded_time_ids(tiny_sdxl, tmp_path / "b", wide) == [[32, 64, 1, 0, 20, 44]]


def test_a_stopped_sdxl_run_resumes_to_the_uninterrupted_runs_weights(
    trained: Bundle, tiny_sdxl: Path, tmp_path: Path
) -> None:
    paths = RunPaths(tmp_path / "ckpt", tmp_path / "art")
    stopping = Trainer(config(tiny_sdxl), examples(), paths)
    stopping.should_stop = lambda: stopping.global_step >= 4  # after the tuning checkpoint
    with pytest.raises(StopRequested):
        stopping.run()
    events: list = []
    resumed = Trainer(config(tiny_sdxl), examples(), paths, CallbackReporter(events.append)).run()
    assert resumed is not None
    # It resumed (a fresh run reaches the same weights too: every draw is seeded).
    assert any(isinstance(e, Log) and "resumed from checkpoint at step 4" in e.message
               for e in events)  # fmt: skip
    assert min(e.global_step for e in events if isinstance(e, Progress)) == 5
    for name in ("lora_path", "embeddings_path"):
        want, got = load_file(getattr(trained, name)), load_file(getattr(resumed, name))
        assert want.keys() == got.keys()
        assert all(torch.equal(want[key], got[key]) for key in want), name


def test_dreambooth_with_prior_preservation_on_sdxl(tiny_sdxl: Path, tmp_path: Path) -> None:
    bundle = train(
        tiny_sdxl, tmp_path, method="dreambooth_lora", instance_prompt="a photo of a sks shape",
        max_train_steps_ti=0, max_train_steps_tuning=2, with_prior_preservation=True,
        class_prompt="a photo of a shape", num_class_images=2,
    )  # fmt: skip
    assert bundle.manifest.family == "sdxl" and bundle.manifest.tokens == []
    assert {key.split(".", 1)[0] for key in load_file(bundle.lora_path)} == {
        "unet", "text_encoder", "text_encoder_2",
    }  # fmt: skip
