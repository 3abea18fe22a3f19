"""Our names for the contract's enums, read from the generated enums' own member names.

``JOB_STATE_QUEUED`` is "queued": a member added to the proto is known here without a list
to update, and no raw numbers appear in the client.
"""

from __future__ import annotations

from typing import Any

from loraforge.v1 import common_pb2, generator_pb2, trainer_pb2


def by_name(enum: Any, prefix: str) -> dict[str, int]:
    """{lower-case name: number} for every member but ``*_UNSPECIFIED``."""
    return {name.removeprefix(prefix).lower(): number for name, number in enum.items() if number}


METHODS = by_name(trainer_pb2.TrainingMethod, "TRAINING_METHOD_")
TEMPLATES = by_name(trainer_pb2.CaptionTemplate, "CAPTION_TEMPLATE_")
JOB_STATES = by_name(trainer_pb2.JobState, "JOB_STATE_")
PHASES = by_name(trainer_pb2.TrainingPhase, "TRAINING_PHASE_")
TRAINING_ENUMS = {  # TrainingConfig fields that are enums
    "lr_scheduler": by_name(trainer_pb2.LrScheduler, "LR_SCHEDULER_"),
    "lr_scheduler_lora": by_name(trainer_pb2.LrScheduler, "LR_SCHEDULER_"),
    "mixed_precision": by_name(trainer_pb2.MixedPrecision, "MIXED_PRECISION_"),
    "evaluation_scorer": by_name(trainer_pb2.EvaluationScorer, "EVALUATION_SCORER_"),
    "select_final": by_name(trainer_pb2.FinalSelection, "FINAL_SELECTION_"),
}
# "default": the server's model's own scheduler (SCHEDULER_UNSPECIFIED).
SCHEDULERS = {"default": 0, **by_name(generator_pb2.Scheduler, "SCHEDULER_")}
IMAGE_FORMATS = by_name(common_pb2.ImageFormat, "IMAGE_FORMAT_")


def name_of(names: dict[str, int], number: int, unknown: str = "unknown") -> str:
    """The name of an enum number in a received message (``unknown`` for a newer member)."""
    return next((name for name, n in names.items() if n == number), unknown)
