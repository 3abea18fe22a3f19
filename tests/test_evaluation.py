"""Evaluation during training: the best checkpoint can be the final artifact, the CLIP scorer
loads a real (tiny, local) CLIP with ``from_pretrained``, and the generator applies an
adapter at its recommended scale. The toy-world curve and its match with the generator are
test_concept_fidelity's; the CLI's table is test_client_cli's."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.evaluation import Evaluation, ScaleScore, recommend
from loraforge_core.models import load_pipeline
from loraforge_core.toyworld.fidelity import CONCEPT_TRAINING, concept_examples
from trainer_service.config import TrainingConfig
from trainer_service.events import CheckpointEvaluated, FinalArtifact, ListReporter
from trainer_service.training.data import InstanceExample
from trainer_service.training.trainer import RunPaths, StopRequested, Trainer


class DivergingTrainer(Trainer):
    """Deliberately broken after its first checkpoint: every LoRA flips its sign before the
    next one is written, as a run whose weights diverge goes bad."""

    def _save_checkpoint(self, phase, optimizer, scheduler) -> None:
        if self.evaluations:
            with torch.no_grad():
                for module in self._components().values():
                    for name, param in module.named_parameters():
                        if "lora_B" in name:
                            param.neg_()
        super()._save_checkpoint(phase, optimizer, scheduler)


def examples() -> list[InstanceExample]:
    return [InstanceExample(image, name, caption) for name, image, caption in concept_examples()]


@pytest.mark.slow
def test_select_final_best_takes_an_earlier_checkpoint_that_scored_better(tmp_path) -> None:
    config = TrainingConfig(device="cpu", **{
        # 100 + 100 LoRA steps to the first checkpoint (at scale 1: 38% purple, score 0.75);
        # the second, its LoRA flipped, scores 0 (unflipped it would score 2.0).
        **CONCEPT_TRAINING, "max_train_steps_ti": 100, "max_train_steps_tuning": 300,
        "save_steps": 200,
        "learning_rate_unet": 2e-3, "learning_rate_text": 1e-3,
        "evaluation_scales": [0.0, 1.0, 2.0],
        "evaluation_images": 2, "evaluation_steps": 10, "select_final": "best",
    })  # fmt: skip
    reporter = ListReporter()
    paths = RunPaths(tmp_path / "c", tmp_path / "a")
    # Stopped after the first checkpoint and resumed: the evaluations so far come back with
    # the checkpoint, so the choice still sees the first one.
    stopping = DivergingTrainer(config, examples(), paths, reporter)
    stopping.should_stop = lambda: stopping.global_step >= 200
    with pytest.raises(StopRequested):
        stopping.run()
    bundle = DivergingTrainer(config, examples(), paths, reporter).run()
    evaluated = [e for e in reporter.events if isinstance(e, CheckpointEvaluated)]
    first, second = (Evaluation.from_dict(e.evaluation) for e in evaluated)
    assert (first.global_step, second.global_step) == (200, 400)
    assert first.score > second.score, (first, second)
    assert [e.best for e in evaluated] == [True, False]
    (final,) = [e for e in reporter.events if isinstance(e, FinalArtifact)]
    assert (final.artifact_id, final.global_step) == (evaluated[0].artifact_id, 200)
    assert bundle is not None and bundle.id == evaluated[0].artifact_id
    assert Evaluation.from_dict(bundle.manifest.evaluation) == first


def tiny_clip(folder: Path) -> Path:
    """A CLIP with random weights and the real classes, saved like a hub model."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from loraforge_core.models import write_tiny_tokenizer

    write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_the_clip_scorer_loads_a_local_clip_and_tells_the_adapter_from_the_base(
    tiny_model: Path, tmp_path: Path
) -> None:
    clip = tiny_clip(tmp_path / "clip")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), device="cpu", max_train_steps_ti=5,
        max_train_steps_tuning=10, save_steps=15, learning_rate_unet=5e-2, seed=0,
        evaluation_scales=[0.0, 1.0], evaluation_images=2, evaluation_scorer="clip",
        evaluation_model=str(clip), evaluation_steps=4,
    )  # fmt: skip
    reporter = ListReporter()
    bundle = Trainer(config, examples(), RunPaths(tmp_path / "c", tmp_path / "a"), reporter).run()
    (event,) = [e for e in reporter.events if isinstance(e, CheckpointEvaluated)]
    evaluation = Evaluation.from_dict(event.evaluation)
    assert (evaluation.scorer, evaluation.scorer_model) == ("clip", str(clip))
    base, adapted = evaluation.scores
    for s in evaluation.scores:
        for value in (s.subject_fidelity, s.prompt_fidelity):
            assert math.isfinite(value) and -1 <= value <= 1
        assert s.images == 4  # 2 default prompts x 2 images
    assert base.subject_fidelity != adapted.subject_fidelity
    assert base.prompt_fidelity != adapted.prompt_fidelity
    assert bundle is not None and bundle.manifest.evaluation == evaluation.to_dict()


def test_a_scorer_that_cannot_load_fails_the_run_before_training(tiny_model, tmp_path) -> None:
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), device="cpu", evaluation_scales=[1.0],
        evaluation_scorer="clip", evaluation_model=str(tmp_path / "no-clip-here"),
    )  # fmt: skip
    with pytest.raises(OSError, match="no-clip-here"):
        Trainer(config, examples(), RunPaths(tmp_path / "c", tmp_path / "a"))


def test_the_recommended_scale_is_the_smallest_with_most_of_the_strength() -> None:
    curve = [ScaleScore(0.0, 0.0, 0.9, 8), ScaleScore(0.5, 0.5, 0.8, 8),
             ScaleScore(0.75, 0.92, 0.7, 8), ScaleScore(1.0, 1.0, 0.5, 8)]  # fmt: skip
    assert recommend(curve).scale == 0.75  # 90% of the way from 0 to 1.0
    assert Evaluation.of(10, curve, "toy_world", "", 1.0).score == pytest.approx(0.92 + 0.7)
    flat = [ScaleScore(0.0, 0.3, 0.3, 8), ScaleScore(0.8, 0.3, 0.3, 8)]
    assert recommend(flat).scale == 0.8  # the curve says nothing: the scale nearest 1


def test_use_recommended_scale_multiplies_the_adapters_measured_scale(tmp_path) -> None:
    from loraforge_core.bundle import read_bundle, write_bundle
    from trainer_service.training.lora import random_lora_bundle

    source = random_lora_bundle("", tmp_path / "store", seed=3, token="<r1>")
    manifest = source.manifest
    curve = [ScaleScore(0.0, 0.0, 0.0, 8), ScaleScore(0.6, 1.0, 1.0, 8)]
    manifest.evaluation = Evaluation.of(100, curve, "toy_world", "", 1.0).to_dict()
    measured = write_bundle(tmp_path / "measured", source.lora_state_dict(),
                            source.embeddings(), manifest)  # fmt: skip
    assert read_bundle(measured.path).manifest.evaluation["recommended_scale"] == 0.6
    engine = build_engine(load_pipeline(""), tmp_path / "gen")
    engine.adapters.register("r", data=pack(measured.path))

    def render(request: AdapterRequest) -> np.ndarray:
        spec = GenerationSpec(prompt="a <r1> circle", steps=4, seed=2, adapters=[request])
        data = engine.generate(spec)[0].data
        return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)

    relative = render(AdapterRequest("r", 1.0, use_recommended_scale=True))
    assert np.array_equal(relative, render(AdapterRequest("r", 0.6)))
    assert not np.array_equal(relative, render(AdapterRequest("r", 1.0)))
