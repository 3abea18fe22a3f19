"""What the trainer renders while it trains: a preview of the validation prompt every
``validation_steps``, and at each checkpoint the evaluation of the weights as they are (the
configured scales of every LoRA layer, rendered and scored: scoring.py). Both run on the
training device, in the main process; training waits exactly as long."""

from __future__ import annotations

import io
import time
from typing import Any

import torch

from loraforge_core.evaluation import Evaluation
from trainer_service.config import TrainingConfig
from trainer_service.events import Preview
from trainer_service.training import lora
from trainer_service.training.scoring import EvaluationPlan

# Images an evaluation draws in one pipeline call. Four cost 0.59x of four alone on the tiny
# model (one CPU core; 16: 0.51x), and keep the denoiser's batch (eight, with guidance) small
# beside the training state that stays in memory meanwhile.
RENDER_BATCH = 4


def evaluate_weights(
    scorer: Any, config: TrainingConfig, model: Any, components: list[torch.nn.Module],
    resolution: int, global_step: int,
) -> Evaluation:  # fmt: skip
    """The evaluation of the weights at ``global_step``; ``components`` are the modules whose
    LoRA layers the scales apply to (the learned tokens stay at every scale)."""
    started = time.perf_counter()
    steps, guidance = config.evaluation_steps, config.evaluation_guidance

    def render_at(prompts: list[str], scale: float, seeds: list[int]) -> list[Any]:
        images = []
        with lora.scaled(components, scale):
            for start in range(0, len(prompts), RENDER_BATCH):
                batch = slice(start, start + RENDER_BATCH)
                images += model.render(prompts[batch], resolution, seeds[batch], steps, guidance)
        return images

    plan = EvaluationPlan(list(config.evaluation_scales), list(config.evaluation_prompts),
                          config.evaluation_images, config.evaluation_seed)  # fmt: skip
    subject = "".join(config.learned_tokens) or config.instance_prompt
    scores = scorer.evaluate(render_at, subject, plan)
    return Evaluation.of(global_step, scores, scorer.name, scorer.model,
                         time.perf_counter() - started)  # fmt: skip


@torch.no_grad()
def preview(
    config: TrainingConfig, model: Any, resolution: int, seed: int, global_step: int
) -> Preview | None:
    """The validation prompt rendered at this step, if this step is due for one."""
    every = config.validation_steps or config.save_steps
    if not config.validation_prompt or global_step % every:
        return None
    (image,) = model.render([config.validation_prompt], resolution, [seed])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Preview(
        global_step=global_step, prompt=config.validation_prompt, png=buffer.getvalue(),
        width=image.width, height=image.height,
    )  # fmt: skip
