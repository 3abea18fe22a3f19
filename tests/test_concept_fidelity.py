"""Concept learning, measured: PTI teaches the shipped tiny model a colour it never saw, and
the fidelity check fails when the LoRA is not applied or the trainer's loss target is wrong.

Each test trains the demo's recipe (about 140 s on 2 cores) and scores images with the
toy-world checker; the full table over five scales is in docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path

from loraforge_core.bundle import Bundle
from loraforge_core.fidelity import (
    CONCEPT_COLOR,
    CONCEPT_TRAINING,
    Concept,
    concept_examples,
    evaluate,
)
from loraforge_core.models import load_pipeline
from trainer_service.config import TrainingConfig
from trainer_service.training.data import InstanceExample
from trainer_service.training.engine import RunPaths, Trainer

SEEDS = 4  # per probe: 16 images per scale


class EpsilonTargetTrainer(Trainer):
    """Deliberately broken: it regresses the noise while the model predicts the velocity."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        scheduler = self.model.noise_scheduler
        assert scheduler.config.prediction_type == "v_prediction"
        scheduler.register_to_config(prediction_type="epsilon")


def train(tmp_path: Path, trainer_class: type[Trainer] = Trainer) -> Bundle:
    config = TrainingConfig(pretrained_model_name_or_path="", device="cpu", **CONCEPT_TRAINING)
    examples = [
        InstanceExample(image, name, caption) for name, image, caption in concept_examples()
    ]
    bundle = trainer_class(config, examples, RunPaths(tmp_path / "c", tmp_path / "a")).run()
    assert bundle is not None
    return bundle


def subject_fidelity(bundle: Bundle, scales: tuple[float, ...]) -> dict[float, float]:
    rows = evaluate(load_pipeline(""), bundle.path, Concept(CONCEPT_COLOR), scales=scales,
                    seeds=SEEDS)  # fmt: skip
    return {row.scale: row.subject_fidelity for row in rows}


def test_pti_teaches_a_colour_the_base_model_never_saw(tmp_path: Path) -> None:
    fidelity = subject_fidelity(train(tmp_path), (0.0, 1.0))
    # Scale 0 is the LoRA not applied (the learned token stays): the base cannot draw purple.
    assert fidelity[0.0] <= 0.1, fidelity
    assert fidelity[1.0] >= 0.75, fidelity


def test_a_wrong_loss_target_fails_the_fidelity_check(tmp_path: Path) -> None:
    fidelity = subject_fidelity(train(tmp_path, EpsilonTargetTrainer), (1.0,))
    assert fidelity[1.0] < 0.5, fidelity
