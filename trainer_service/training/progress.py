"""Steps per second and time left, as a person watching a job can trust them.

The rate is the current phase's average since its first step ended: loading and warm-up
before that step do not count, and a slow step (a checkpoint, a preview) moves it only by its
share instead of swinging a short window. The time left is every remaining step of the run
at that rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StepRate:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start_phase()

    def start_phase(self) -> None:
        self.phase_started = self.clock()
        self.first_step_done: float | None = None
        self.steps = 0

    def step(self) -> float:
        """Record one finished step of the phase; the phase's rate so far (steps/s)."""
        now = self.clock()
        self.steps += 1
        if self.first_step_done is None:
            self.first_step_done = now
            elapsed = now - self.phase_started  # the only measure there is yet
            return 1.0 / elapsed if elapsed > 0 else 0.0
        elapsed = now - self.first_step_done
        return (self.steps - 1) / elapsed if elapsed > 0 else 0.0


def eta_seconds(remaining_steps: int, rate: float) -> float:
    return remaining_steps / rate if rate > 0 else 0.0
