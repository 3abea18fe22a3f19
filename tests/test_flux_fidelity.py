"""Concept learning on FLUX.1, measured: PTI (tokens in CLIP-L and T5, then LoRA on the
transformer and CLIP-L) teaches the shipped tiny FLUX a colour it never saw, the subject
fidelity of stock ``FluxPipeline`` images rising with the adapter's scale; and the same check
fails when the trainer's loss target is wrong (the suite's proof that it can fail: SD's
recipe with its wrong target reads 0% too, docs/architecture.md, at four times the cost)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge_core.families.objectives import FlowMatching, Noised
from loraforge_core.toyworld.fidelity import SCALES
from tests.test_concept_fidelity import subject_fidelity, train
from trainer_service.training.trainer import Trainer

pytestmark = pytest.mark.slow

FLUX_RECIPE = {"max_train_steps_ti": 100, "max_train_steps_tuning": 200, "learning_rate_ti": 5e-4}


class ReversedFlowTrainer(Trainer):
    """Deliberately broken: it regresses ``latents - noise``, the velocity reversed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.objective, FlowMatching)
        right = self.objective.noised

        def reversed_target(*args, **kwargs) -> Noised:
            noised = right(*args, **kwargs)
            noised.target = -noised.target
            return noised

        self.objective.noised = reversed_target


def test_pti_teaches_the_tiny_flux_a_colour_and_fidelity_rises_with_scale(tmp_path: Path) -> None:
    bundle = train(tmp_path, model="tiny-flux", **FLUX_RECIPE)
    assert bundle.manifest.family == "flux"
    assert len(bundle.token_vectors()["<s1>"]) == 2  # a row in CLIP-L and one in T5
    fidelity = subject_fidelity(bundle, SCALES, model="tiny-flux")
    assert fidelity[0.0] <= 0.1, fidelity
    assert fidelity[1.0] >= 0.75, fidelity
    rising = [fidelity[s] for s in SCALES]
    assert rising == sorted(rising), fidelity


def test_a_wrong_loss_target_fails_the_fidelity_check(tmp_path: Path) -> None:
    bundle = train(tmp_path, ReversedFlowTrainer, model="tiny-flux", **FLUX_RECIPE)
    fidelity = subject_fidelity(bundle, (1.0,), model="tiny-flux")
    assert fidelity[1.0] < 0.5, fidelity
