"""The LoRA mixer (inference_service/mixing.py) against peft's own LoRA forward, on real peft
layers: a Linear and a Conv2d with three adapters of different ranks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from inference_service.mixing import LoraMixer, row_weights
from loraforge_core.families import SD

ADAPTERS = {"a": 4, "b": 2, "c": 3}  # name -> rank
ROWS = 4


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor):
        return self.proj(tokens), self.conv(image)


def lora_model() -> Model:
    torch.manual_seed(0)
    model = Model()
    for name, rank in ADAPTERS.items():
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj", "conv"])
        inject_adapter_in_model(config, model, adapter_name=name)
    for module in model.modules():  # peft initialises B to zero: give every adapter an effect
        if isinstance(module, LoraLayer):
            for up in module.lora_B.values():
                torch.nn.init.normal_(up.weight)
    return model.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, 7, 6, generator=generator), torch.randn(
        ROWS, 3, 8, 8, generator=generator
    )


def peft_reference(model: Model, weights_per_row: list[dict[str, float]]):
    """Each row through peft's forward: the base plus each adapter's delta times its weight
    (peft applies one adapter at its fixed scale, so each delta is measured alone)."""
    tokens, image = inputs()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for layer in layers:
            layer.enable_adapters(False)
        base = model(tokens, image)
        deltas = {}
        for name in ADAPTERS:
            for layer in layers:
                layer.enable_adapters(True)
                layer.set_adapter(name)
            deltas[name] = [out - b for out, b in zip(model(tokens, image), base, strict=True)]
    outputs = []
    for index in range(2):
        rows = []
        for row, weights in enumerate(weights_per_row):
            value = base[index][row].clone()
            for name, w in weights.items():
                value += w * deltas[name][index][row]
            rows.append(value)
        outputs.append(torch.stack(rows))
    return outputs


def mixed(model: Model, weights: dict, *, fuse: bool, component: str = "unet"):
    pipe = SimpleNamespace(unet=torch.nn.Identity(), text_encoder=torch.nn.Identity())
    setattr(pipe, component, model)
    mixer = LoraMixer(pipe, SD.components, fuse=fuse)
    mixer.set(component, weights)
    kinds = {layer.mix_plan.kind for layer in mixer.layers[component]}
    with torch.no_grad():
        out = model(*inputs())
    mixer.clear()
    return kinds, out


def assert_close(ours, reference) -> None:
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "stacked"])
def test_one_set_for_every_row_matches_peft(fuse):
    weights = {"a": 0.7, "c": -1.3}
    reference = peft_reference(lora_model(), [weights] * ROWS)
    kinds, ours = mixed(lora_model(), weights, fuse=fuse)
    assert kinds == {"fused" if fuse else "stacked"}
    assert_close(ours, reference)


def test_the_text_encoder_takes_the_stacked_factors_not_a_merge():
    model = lora_model()
    pipe = SimpleNamespace(unet=torch.nn.Identity(), text_encoder=model)
    mixer = LoraMixer(pipe, SD.components)
    mixer.set("text_encoder", {"a": 0.5})
    assert {layer.mix_plan.kind for layer in mixer.layers["text_encoder"]} == {"stacked"}
    mixer.set("text_encoder", {"a": (0.5, 0.0)})
    assert {layer.mix_plan.kind for layer in mixer.layers["text_encoder"]} == {"gathered"}


@pytest.mark.parametrize("fuse", [True, False], ids=["fusion-on", "fusion-off"])
def test_each_row_with_its_own_adapters_and_weights_matches_peft(fuse):
    # Row 0 no adapter, row 1 one, row 2 two at other weights, row 3 all three.
    per_row = [{}, {"a": 1.0}, {"b": 0.4, "c": 2.0}, {"a": -0.5, "b": 1.0, "c": 0.25}]
    weights = {name: row_weights([row.get(name, 0.0) for row in per_row]) for name in ADAPTERS}
    reference = peft_reference(lora_model(), per_row)
    kinds, ours = mixed(lora_model(), weights, fuse=fuse)
    assert kinds == {"gathered"}
    assert_close(ours, reference)


def test_fusing_never_changes_the_base_weights():
    model = lora_model()
    before = copy.deepcopy(model.state_dict())
    tokens, image = inputs()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.enable_adapters(False)
        base = model(tokens, image)
    kinds, _ = mixed(model, {"a": 1.0, "b": 0.3}, fuse=True)
    assert kinds == {"fused"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert_close(model(tokens, image), base)


def test_a_slot_uses_only_its_adapters_rank():
    """A rank-2 adapter in a rank-4 layer computes rank 2, with the same result."""
    model = lora_model()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.lora_A["a"].weight[2:] = 0  # what a slot holds past the adapter's rank
    reference = peft_reference(copy.deepcopy(model), [{"a": 0.8}] * ROWS)
    pipe = SimpleNamespace(unet=model, text_encoder=torch.nn.Identity())
    mixer = LoraMixer(pipe, SD.components, fuse=False)
    mixer.adapter_changed("a", rank=2)
    mixer.set("unet", {"a": 0.8})
    assert {layer.mix_plan.down.shape[0] for layer in mixer.layers["unet"]} == {2}
    with torch.no_grad():
        assert_close(model(*inputs()), reference)


def test_new_factors_are_applied_once_the_mixer_is_told():
    model = lora_model()
    pipe = SimpleNamespace(unet=model, text_encoder=torch.nn.Identity())
    mixer = LoraMixer(pipe, SD.components, fuse=True)
    mixer.set("unet", {"a": 1.0})
    with torch.no_grad():
        first = model(*inputs())
        for layer in mixer.layers["unet"]:
            layer.lora_B["a"].weight.mul_(2)  # a slot refilled with another adapter
    mixer.adapter_changed("a")
    mixer.set("unet", {"a": 1.0})  # the same set as before: rebuilt, not reused
    with torch.no_grad():
        second = model(*inputs())
    assert not torch.allclose(first[0], second[0])
    assert_close(second, peft_reference(lora_model_doubled_a(), [{"a": 1.0}] * ROWS))


def lora_model_doubled_a() -> Model:
    model = lora_model()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.lora_B["a"].weight.mul_(2)
    return model


def test_a_weight_every_row_shares_stays_one_number():
    assert row_weights([0.5, 0.5, 0.5], repeats=2) == 0.5
    assert row_weights([0.0]) == 0.0
    # Classifier-free guidance: the unconditional half, then the conditional half.
    assert row_weights([1.0, 0.0, 0.25], repeats=2) == (1.0, 0.0, 0.25, 1.0, 0.0, 0.25)
