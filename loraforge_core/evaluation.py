"""A checkpoint's measured strength: scores of its renders at several adapter scales.

Training scores each checkpoint (trainer_service/training/scoring.py); the bundle's manifest
carries the evaluation, the trainer streams it and returns it with the artifact, and the
generator returns it with the adapter and can apply an adapter at its recommended scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The recommended scale gets this share of the way from the smallest scale's subject fidelity
# to the best one's.
RECOMMEND_SHARE = 0.9


@dataclass(frozen=True)
class ScaleScore:
    scale: float
    subject_fidelity: float  # does it show the subject (toy world: a fraction; CLIP-I)
    prompt_fidelity: float  # does it follow the rest of the prompt (toy world: a fraction; CLIP-T)
    images: int


@dataclass(frozen=True)
class Evaluation:
    global_step: int
    scores: tuple[ScaleScore, ...]
    scorer: str  # toy_world | clip
    scorer_model: str  # the CLIP model's id or folder; empty for toy_world
    recommended_scale: float
    score: float  # subject + prompt fidelity at the recommended scale: ranks checkpoints
    seconds: float = 0.0  # scoring time, which training waited for

    @classmethod
    def of(
        cls, global_step: int, scores: list[ScaleScore], scorer: str, model: str, seconds: float
    ) -> Evaluation:
        """The evaluation of ``scores``, with its recommended scale and score."""
        chosen = recommend(scores)
        return cls(
            global_step, tuple(sorted(scores, key=lambda s: s.scale)), scorer, model,
            chosen.scale, chosen.subject_fidelity + chosen.prompt_fidelity, seconds,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = [asdict(s) for s in self.scores]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["scores"] = tuple(ScaleScore(**s) for s in known.get("scores", ()))
        return cls(**known)


def recommend(scores: list[ScaleScore]) -> ScaleScore:
    """The smallest scale whose subject fidelity gets ``RECOMMEND_SHARE`` of the way from the
    smallest scale's to the best: most of the adapter's strength, and of the scales that give
    it the one that costs the prompt least (prompt fidelity falls as the scale grows). Where
    no scale gains anything the curve says nothing: the scale nearest 1, the nominal one."""
    ordered = sorted(scores, key=lambda s: s.scale)
    floor = ordered[0].subject_fidelity
    best = max(s.subject_fidelity for s in ordered)
    if best <= floor:
        return min(ordered, key=lambda s: (abs(s.scale - 1.0), -s.scale))
    target = floor + RECOMMEND_SHARE * (best - floor) - 1e-9
    return next(s for s in ordered if s.subject_fidelity >= target)


def to_proto(evaluation: Evaluation, message: Any) -> Any:
    """Fill a ``loraforge.v1.Evaluation`` message."""
    message.global_step = evaluation.global_step
    message.scorer, message.scorer_model = evaluation.scorer, evaluation.scorer_model
    message.recommended_scale, message.score = evaluation.recommended_scale, evaluation.score
    message.seconds = evaluation.seconds
    for s in evaluation.scores:
        message.scores.add(scale=s.scale, subject_fidelity=s.subject_fidelity,
                           prompt_fidelity=s.prompt_fidelity, images=s.images)  # fmt: skip
    return message
