"""Concept learning on Z-Image, measured: DreamBooth-LoRA on the transformer teaches the shipped
tiny Z-Image a colour it never saw, bound to a rare word ("<s1>", which Qwen's tokenizer spells
as four byte tokens), the subject fidelity of stock ``ZImagePipeline`` images rising with the
adapter's scale; and the check fails when the trainer's loss target is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge_core.models import load_pipeline
from loraforge_core.toyworld.fidelity import SCALES, Concept, evaluate
from tests.test_concept_fidelity import CONCEPT_COLOR, SEEDS, train
from tests.test_flux_fidelity import ReversedFlowTrainer

pytestmark = pytest.mark.slow

ZIMAGE_RECIPE = {
    "method": "dreambooth_lora", "placeholder_tokens": [], "initializer_tokens": [],
    "instance_prompt": "a <s1> object", "max_train_steps_ti": 0, "max_train_steps_tuning": 300,
}  # fmt: skip


def fidelity(bundle, scales) -> dict[float, float]:
    rows = evaluate(load_pipeline("tiny-zimage"), bundle.path, Concept(CONCEPT_COLOR),
                    scales=scales, seeds=SEEDS, trigger="<s1>")  # fmt: skip
    return {row.scale: row.subject_fidelity for row in rows}


def test_dreambooth_teaches_the_tiny_zimage_a_colour_and_fidelity_rises_with_scale(
    tmp_path: Path,
) -> None:
    bundle = train(tmp_path, model="tiny-zimage", **ZIMAGE_RECIPE)
    assert bundle.manifest.family == "zimage" and bundle.manifest.tokens == []
    read = fidelity(bundle, SCALES)
    assert read[0.0] <= 0.1, read
    assert read[1.0] >= 0.75, read
    rising = [read[s] for s in SCALES]
    assert rising == sorted(rising), read


def test_a_wrong_loss_target_fails_the_zimage_fidelity_check(tmp_path: Path) -> None:
    bundle = train(tmp_path, ReversedFlowTrainer, model="tiny-zimage", **ZIMAGE_RECIPE)
    read = fidelity(bundle, (1.0,))
    assert read[1.0] < 0.5, read
