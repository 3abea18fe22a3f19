"""The placeholder tokens of pivotal tuning: new rows in each text encoder's embedding.

A token is added to every tokenizer of the model and gets a row in every text encoder (SDXL:
a 768-wide one in CLIP-L and a 1280-wide one in CLIP-G, learned together, as the diffusers
advanced SDXL script and cog-sdxl do). Only these rows learn: after each optimizer step every
other row is restored, and with ``clip_ti_decay`` each new row's norm is pulled toward 0.4
with strength min(1, 100 * lr), as lora_pti does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainer_service.training.base_model import BaseModel

CLIP_TI_TARGET_NORM = 0.4


class _TokenRows:
    """The new tokens' rows in one (tokenizer, text encoder) pair."""

    def __init__(
        self, tokenizer: Any, text_encoder: Any, tokens: list[str], initializers: list[str],
        generator: torch.Generator,
    ) -> None:  # fmt: skip
        self.text_encoder = text_encoder
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError(f"placeholder tokens {tokens} already exist in the tokenizer")
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.ids: list[int] = tokenizer.convert_tokens_to_ids(tokens)
        weight = self.weight
        with torch.no_grad():
            for token_id, init in zip(self.ids, initializers, strict=True):
                weight[token_id] = _initial(tokenizer, init, weight, generator)
        self.original = weight.detach().clone()
        self.keep_rows = torch.ones(len(tokenizer), dtype=torch.bool)
        self.keep_rows[self.ids] = False

    @property
    def weight(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    @torch.no_grad()
    def after_step(self, strength: float | None) -> None:
        weight = self.weight
        if strength is not None:
            rows = weight[self.ids]
            norm = rows.norm(dim=-1, keepdim=True)
            weight[self.ids] = F.normalize(rows, dim=-1) * (
                norm + strength * (CLIP_TI_TARGET_NORM - norm)
            )
        keep = self.keep_rows.to(weight.device)
        weight[keep] = self.original.to(weight)[keep]

    def rows(self) -> torch.Tensor:
        return self.weight[self.ids].detach().float().cpu().clone()

    @torch.no_grad()
    def load_rows(self, rows: torch.Tensor) -> None:
        self.weight[self.ids] = rows.to(self.weight)


def _initial(
    tokenizer: Any, init: str, weight: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A new row: zeros (``<zero>``), Gaussian (``<rand-STD>``), or a one-token word's row."""
    dim = weight.shape[1]
    if init == "<zero>":
        return torch.zeros(dim)
    if init.startswith("<rand-"):
        std = float(init[len("<rand-") : -1])
        return torch.randn(dim, generator=generator).to(weight) * std
    ids = tokenizer(init, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"initializer {init!r} is {len(ids)} tokens in this tokenizer; use one token"
        )
    return weight[ids[0]].detach().clone()


class PlaceholderTokens:
    """Adds ``tokens`` to the model's tokenizers and text encoders, initialised from
    ``initializers`` (a one-token word, ``<zero>`` or ``<rand-STD>``)."""

    def __init__(
        self, model: BaseModel, tokens: list[str], initializers: list[str], seed: int
    ) -> None:
        self.model = model
        self.tokens = list(tokens)
        self.tables: list[_TokenRows] = []
        if not tokens:
            return
        generator = torch.Generator().manual_seed(seed)
        self.tables = [
            _TokenRows(tokenizer, encoder, self.tokens, initializers, generator)
            for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=True)
        ]

    @property
    def ids(self) -> list[int]:
        """The tokens' ids in the first tokenizer (empty: no tokens)."""
        return self.tables[0].ids if self.tables else []

    def weights(self) -> list[torch.Tensor]:
        """The embedding matrices that hold the tokens' rows (what inversion optimises)."""
        return [table.weight for table in self.tables]

    def after_step(self, lr: float, clip_ti_decay: bool) -> None:
        """Restore every row but the new tokens'; pull their norms toward 0.4."""
        strength = min(1.0, 100 * lr) if clip_ti_decay else None
        for table in self.tables:
            table.after_step(strength)

    def rows(self) -> list[torch.Tensor]:
        """The new tokens' rows in each text encoder (for a checkpoint)."""
        return [table.rows() for table in self.tables]

    def load_rows(self, rows: list[torch.Tensor]) -> None:
        for table, table_rows in zip(self.tables, rows, strict=True):
            table.load_rows(table_rows)

    def learned(self) -> dict[str, torch.Tensor]:
        """The bundle's embeddings: {token: vector} for one text encoder; for several, one
        [tokens, width] matrix per encoder under the family's embedding-file keys
        (``clip_l``, ``clip_g``), rows in token order."""
        if not self.tables:
            return {}
        keys = self.model.family.embedding_keys
        if keys == ("",):
            rows = self.tables[0].rows()
            return {token: row.clone() for token, row in zip(self.tokens, rows, strict=True)}
        return {key: table.rows() for key, table in zip(keys, self.tables, strict=True)}
