"""How a mixed batch lays out each adapter's weights (inference_service/mixing.py)."""

from __future__ import annotations

import torch

from inference_service.mixing import RowWeights, row_weights


def runs(weight: RowWeights) -> list[tuple[int, int, list[float]]]:
    return [(start, stop, factors.tolist()) for start, stop, factors in weight.runs]


def test_a_weight_every_row_shares_stays_one_number() -> None:
    assert row_weights([0.5, 0.5, 0.5], repeats=2) == 0.5
    assert row_weights([0.0]) == 0.0


def test_rows_that_use_an_adapter_become_runs_of_consecutive_rows() -> None:
    weight = row_weights([0.0, 0.75, 0.75, 0.0, -0.5])
    assert isinstance(weight, RowWeights)
    assert runs(weight) == [(1, 3, [0.75, 0.75]), (4, 5, [-0.5])]


def test_guidance_halves_repeat_the_layout() -> None:
    # Classifier-free guidance: the unconditional half, then the conditional half.
    weight = row_weights([1.0, 0.0, 0.25], repeats=2)
    assert runs(weight) == [(0, 1, [1.0]), (2, 4, [0.25, 1.0]), (5, 6, [0.25])]
    assert all(f.dtype == torch.float32 for _, _, f in weight.runs)
