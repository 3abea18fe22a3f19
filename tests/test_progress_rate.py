"""The rate and time left that a job reports (trainer_service/training/progress.py)."""

from __future__ import annotations

from tests.helpers import Clock
from trainer_service.training.progress import StepRate, eta_seconds


def test_warm_up_before_the_first_step_does_not_drag_the_rate() -> None:
    clock = Clock()
    rate = StepRate(clock)
    clock.now = 30.0  # loading the model, the first step's warm-up
    rate.step()
    rates = []
    for _ in range(10):
        clock.now += 0.1
        rates.append(rate.step())
    assert abs(rates[-1] - 10.0) < 1e-6
    assert abs(eta_seconds(100, rates[-1]) - 10.0) < 1e-6


def test_a_slow_step_moves_the_rate_by_its_share_only() -> None:
    clock = Clock()
    rate = StepRate(clock)
    rate.step()
    for _ in range(40):
        clock.now += 0.1
        before = rate.step()
    clock.now += 1.0  # a checkpoint
    after = rate.step()
    assert 0.75 * before < after < before  # a 20-step window would have dropped to ~0.68x


def test_each_phase_measures_its_own_rate() -> None:
    clock = Clock()
    rate = StepRate(clock)
    for _ in range(5):
        clock.now += 0.01
        rate.step()
    rate.start_phase()
    clock.now += 1.0
    rate.step()
    clock.now += 0.5
    assert abs(rate.step() - 2.0) < 1e-6
