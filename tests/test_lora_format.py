"""The native LoRA format: packing peft states, reading them back as pairs, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from loraforge_core.lora_format import FormatError, lora_pairs, lora_rank, pack_lora, pairs_state

DOWN, UP = torch.randn(4, 32), torch.randn(32, 4)
PEFT = {"attn.to_q.lora_A.weight": DOWN, "attn.to_q.lora_B.weight": UP}


def test_alpha_over_rank_is_folded_into_up_and_the_pairs_read_back() -> None:
    packed = pack_lora({"unet": PEFT, "text_encoder": {}}, rank=4, alpha=8.0)
    assert set(packed) == {"unet.attn.to_q.lora_A.weight", "unet.attn.to_q.lora_B.weight"}
    ((key, (down, up)),) = lora_pairs(packed).items()
    assert key == ("unet", "attn.to_q")
    assert torch.equal(down, DOWN) and torch.allclose(up, UP * 2.0)
    assert pairs_state(lora_pairs(packed)) == packed
    assert lora_rank(packed) == 4


@pytest.mark.parametrize("state, message", [
    ({"unet.attn.to_q.lora_A.weight": DOWN}, "without its down or up"),
    ({"unet.attn.to_q.lora_down.weight": DOWN}, "unexpected key"),
    ({"vae.decoder.lora_A.weight": DOWN}, "unexpected key"),
])  # fmt: skip
def test_a_state_that_is_not_the_native_format_is_refused(state, message) -> None:
    with pytest.raises(FormatError, match=message):
        lora_pairs(state)


def test_a_component_the_format_has_no_prefix_for_is_refused() -> None:
    with pytest.raises(ValueError, match="vae"):
        pack_lora({"vae": PEFT}, rank=4, alpha=4.0)
