"""How strong a checkpoint is: renders at several adapter scales, scored, and a recommended scale.

Two scorers, both answering "does it show the subject" and "does it follow the prompt":

- ``toy_world``: the toy world's pixel checker (loraforge_core.toyworld.fidelity), exact. The
  concept is what the instance images share as the checker reads them (their colour, their
  shape, or both); the prompts are its probes ("a {}", "a {} circle" ...), whatever the job's
  prompts.
- ``clip``: CLIP embeddings, as lora_pti's ``evaluate_pipe`` and DreamBooth's paper measure:
  subject fidelity is the mean cosine similarity of each render's image embedding to the
  instance images' (CLIP-I), prompt fidelity that of the render to its prompt's text with the
  learned tokens taken out (CLIP-T), which says most with prompts that ask for more than the
  subject ("{} on a beach"). The model loads with ``from_pretrained(path_or_id)``.

A checkpoint's evaluation (loraforge_core.evaluation) records the scores per scale, the
recommended scale and its score, by which the best checkpoint is chosen.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge_core import toyworld
from loraforge_core.evaluation import ScaleScore
from loraforge_core.toyworld.fidelity import Concept, Render
from loraforge_core.toyworld.fidelity import score as toy_score

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


@dataclass
class EvaluationPlan:
    """What to render: the job's evaluation options."""

    scales: list[float]
    prompts: list[str] = field(default_factory=list)  # "{}" = the learned tokens
    images: int = 4  # per prompt and scale
    seed: int = 0


class ToyWorldScorer:
    name = "toy_world"
    model = ""

    def __init__(self, instance_images: list[Any]) -> None:
        readings = [toyworld.check(image) for image in instance_images]
        colors = {r.color for r in readings}
        shapes = {r.shape for r in readings}
        color = colors.pop() if len(colors) == 1 else None
        shape = shapes.pop() if len(shapes) == 1 else None
        if color is None and shape is None:
            raise ValueError(
                "the toy-world scorer needs instance images that share a colour or a shape "
                "the checker reads; use evaluation_scorer CLIP"
            )
        # Images sharing a colour are its concept even when they share a shape too: a colour
        # and shape together would leave only the bare probe ("a {}") to test prompts with.
        self.concept = Concept(color, shape if color is None or len(readings) == 1 else None)

    def evaluate(self, render: Render, tokens: str, plan: EvaluationPlan) -> list[ScaleScore]:
        rows = toy_score(render, self.concept, tokens, scales=plan.scales, seeds=plan.images,
                         first_seed=plan.seed)  # fmt: skip
        return [ScaleScore(r.scale, r.subject_fidelity, r.prompt_fidelity, r.images) for r in rows]


class ClipScorer:
    name = "clip"

    def __init__(self, model: str, instance_images: list[Any], device: torch.device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = model or DEFAULT_CLIP_MODEL
        self.device = device
        self.clip = CLIPModel.from_pretrained(self.model_id).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.model_id)
        self.instances = self._images(instance_images)

    @property
    def model(self) -> str:
        return self.model_id

    @torch.no_grad()
    def _images(self, images: list[Any]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return torch.nn.functional.normalize(self._features(self.clip.get_image_features(**inputs)))

    @torch.no_grad()
    def _texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        features = self.clip.get_text_features(**inputs.to(self.device))
        return torch.nn.functional.normalize(self._features(features))

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        """transformers 5 returns a model output where 4 returned the projected tensor."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def evaluate(self, render: Render, tokens: str, plan: EvaluationPlan) -> list[ScaleScore]:
        prompts = plan.prompts or ["a {}", "a photo of a {}"]
        rows = []
        for scale in plan.scales:
            subject, prompt_scores = [], []
            for template in prompts:
                text = template.format(tokens)
                plain = re.sub(r"\s+", " ", template.format("")).strip()
                images = render([text] * plan.images, scale,
                                [plan.seed + i for i in range(plan.images)])  # fmt: skip
                embedded = self._images(images)
                subject += (embedded @ self.instances.T).mean(dim=1).tolist()
                prompt_scores += (embedded @ self._texts([plain]).T)[:, 0].tolist()
            count = len(subject)
            rows.append(ScaleScore(scale, sum(subject) / count, sum(prompt_scores) / count, count))
        return rows


def make_scorer(
    kind: str, model: str, instance_images: list[Any], base_model: str, device: torch.device
) -> ToyWorldScorer | ClipScorer:
    """The job's scorer; ``auto`` picks the toy world on loraforge's tiny models."""
    if kind == "auto":
        kind = "toy_world" if _is_toy_model(base_model) else "clip"
    if kind == "toy_world":
        return ToyWorldScorer(instance_images)
    return ClipScorer(model, instance_images, device)


def _is_toy_model(path: str) -> bool:
    """Whether ``path`` is one of loraforge's toy-world models (its marker file says so)."""
    marker = Path(path) / "loraforge_model.json"
    return marker.is_file() and "toy world" in json.loads(marker.read_text()).get("trained_on", "")
