"""The placeholder tokens of pivotal tuning: new rows in the text encoder's embedding.

Only these rows learn: after each optimizer step every other row is restored, and with
``clip_ti_decay`` each new row's norm is pulled toward 0.4 with strength min(1, 100 * lr), as
lora_pti does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer_service.training.models import BaseModel

CLIP_TI_TARGET_NORM = 0.4


class PlaceholderTokens:
    """Adds ``tokens`` to the model's tokenizer and embedding, initialised from
    ``initializers`` (a one-token word, ``<zero>`` or ``<rand-STD>``)."""

    def __init__(
        self, model: BaseModel, tokens: list[str], initializers: list[str], seed: int
    ) -> None:
        self.model = model
        self.tokens = list(tokens)
        self.ids: list[int] = []
        if not tokens:
            return
        tokenizer = model.tokenizer
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError(f"placeholder tokens {tokens} already exist in the tokenizer")
        model.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.ids = tokenizer.convert_tokens_to_ids(tokens)
        weight = model.embedding_weight()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for token_id, init in zip(self.ids, initializers, strict=True):
                weight[token_id] = self._initial(init, weight, generator)
        self.original = weight.detach().clone()
        self.keep_rows = torch.ones(len(tokenizer), dtype=torch.bool)
        self.keep_rows[self.ids] = False

    def _initial(self, init: str, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dim = weight.shape[1]
        if init == "<zero>":
            return torch.zeros(dim)
        if init.startswith("<rand-"):
            std = float(init[len("<rand-") : -1])
            return torch.randn(dim, generator=generator).to(weight) * std
        ids = self.model.tokenizer(init, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"initializer {init!r} is {len(ids)} tokens in this tokenizer; use one token"
            )
        return weight[ids[0]].detach().clone()

    @torch.no_grad()
    def after_step(self, lr: float, clip_ti_decay: bool) -> None:
        """Restore every row but the new tokens'; pull their norms toward 0.4."""
        weight = self.model.embedding_weight()
        if clip_ti_decay:
            rows = weight[self.ids]
            norm = rows.norm(dim=-1, keepdim=True)
            strength = min(1.0, 100 * lr)
            weight[self.ids] = F.normalize(rows, dim=-1) * (
                norm + strength * (CLIP_TI_TARGET_NORM - norm)
            )
        keep = self.keep_rows.to(weight.device)
        weight[keep] = self.original.to(weight)[keep]

    def rows(self) -> torch.Tensor:
        """The new tokens' rows (for a checkpoint)."""
        if not self.ids:
            return torch.zeros(0)
        return self.model.embedding_weight()[self.ids].detach().cpu().clone()

    @torch.no_grad()
    def load_rows(self, rows: torch.Tensor) -> None:
        if self.ids:
            weight = self.model.embedding_weight()
            weight[self.ids] = rows.to(weight)

    def learned(self) -> dict[str, torch.Tensor]:
        """{token: embedding} (for a bundle)."""
        weight = self.model.embedding_weight().detach().float().cpu()
        return {token: weight[i].clone() for token, i in zip(self.tokens, self.ids, strict=True)}
