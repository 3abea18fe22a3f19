"""A run's checkpoint evaluations: recorded as each checkpoint is written, saved with the
training state (so a resumed run still sees them), and which artifact becomes the job's final
one (``select_final``: the last, or the best-scoring)."""

from __future__ import annotations

from typing import Any

from loraforge_core.evaluation import Evaluation
from trainer_service.events import CheckpointEvaluated


class CheckpointScores:
    def __init__(self, items: list[tuple[str, Evaluation]] | None = None) -> None:
        self.items = list(items or [])  # (artifact id, evaluation), in step order

    def __len__(self) -> int:
        return len(self.items)

    def last(self) -> tuple[str, Evaluation] | None:
        return self.items[-1] if self.items else None

    def record(self, artifact_id: str, evaluation: Evaluation) -> CheckpointEvaluated:
        """Keep an evaluation; the event says whether it is the best so far (the highest
        score, the later of equals)."""
        best = all(evaluation.score >= e.score for _, e in self.items)
        self.items.append((artifact_id, evaluation))
        return CheckpointEvaluated(artifact_id, evaluation.to_dict(), best)

    def to_state(self, artifact_id: str, evaluation: Evaluation | None) -> list[dict[str, Any]]:
        """What a checkpoint saves: the evaluations so far and its own (None: not scored)."""
        items = self.items + ([(artifact_id, evaluation)] if evaluation else [])
        return [{"artifact_id": a, **e.to_dict()} for a, e in items]

    @classmethod
    def from_state(cls, rows: list[dict[str, Any]]) -> CheckpointScores:
        return cls([(row.pop("artifact_id"), Evaluation.from_dict(row)) for row in map(dict, rows)])

    def final(self, last_id: str, last_step: int, select_final: str) -> tuple[str, int]:
        """(artifact id, step) of the job's final artifact: the last bundle, or with
        ``select_final`` best the best-scoring evaluated one (the later of equals)."""
        if select_final != "best" or not self.items:
            return last_id, last_step
        best_id, best = max(reversed(self.items), key=lambda item: item[1].score)
        return best_id, best.global_step
