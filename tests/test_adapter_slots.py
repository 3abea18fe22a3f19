"""Pre-shaped slots: loading by weight copy gives what a fresh load gives; other adapters take
the general path; a failed load leaves nothing behind."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from inference_service.engine import GeneratorEngine, build_engine
from inference_service.spec import AdapterRequest, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.errors import FailedPrecondition, ResourceExhausted
from loraforge_core.lora_format import lora_pairs
from trainer_service.training.lora import random_lora_bundle


@pytest.fixture()
def engine(tiny_model: Path, tmp_path: Path) -> GeneratorEngine:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return build_engine(pipe, tmp_path / "generator", max_resident=2, slot_rank=8)


def render(engine: GeneratorEngine, *adapters: tuple[str, float]) -> np.ndarray:
    spec = GenerationSpec(
        prompt="a red circle",
        width=32,
        height=32,
        steps=4,
        seed=3,
        adapters=[AdapterRequest(a, s) for a, s in adapters],
    )
    data = engine.generate(spec)[0].data
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255


def stock(tiny_model: Path, bundle) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(bundle.lora_path)
    image = pipe(
        "a red circle",
        width=32,
        height=32,
        num_inference_steps=4,
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    return np.asarray(image, dtype=np.float32) / 255


def test_slots_and_general_path_both_match_a_fresh_diffusers_load(engine, tiny_model, tmp_path):
    small = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=1, rank=4)
    large = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=2, rank=16)
    assert engine.adapters.register("small", data=pack(small.path)).peft_name.startswith("slot-")
    assert engine.adapters.register("large", data=pack(large.path)).peft_name == "adapter-large"
    for name, bundle in (("small", small), ("large", large)):
        assert np.abs(render(engine, (name, 1.0)) - stock(tiny_model, bundle)).mean() <= 1e-3
    # Eviction hands the slot over: a third adapter reuses it by copying weights.
    third = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=3, rank=2)
    entry = engine.adapters.register("third", data=pack(third.path))
    assert entry.peft_name.startswith("slot-")
    assert not engine.adapters.entries["small"].resident
    assert np.abs(render(engine, ("third", 1.0)) - stock(tiny_model, third)).mean() <= 1e-3
    assert np.abs(render(engine, ("small", 1.0)) - stock(tiny_model, small)).mean() <= 1e-3


def test_a_failed_fill_leaves_the_slot_empty_and_the_adapter_unloaded(engine, tiny_model, tmp_path):
    base = render(engine)
    bundle = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=4)
    pairs = lora_pairs(bundle.lora_state_dict())
    key = next(iter(pairs))
    down, up = pairs[key]
    pairs[key] = (torch.zeros(down.shape[0], down.shape[1] + 1), up)  # wrong input size
    slot = engine.adapters.slots.acquire("broken")
    with pytest.raises(ValueError, match="another architecture"):
        engine.adapters.slots.fill(slot, pairs)
    engine.adapters.slots.release(slot)
    for layer in engine.adapters.slots.layers[slot].values():
        assert not layer.lora_A[slot].weight.any() and not layer.lora_B[slot].weight.any()
    assert np.array_equal(render(engine), base)


def test_pinned_adapters_are_never_evicted(engine, tiny_model, tmp_path):
    for i in range(2):
        bundle = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=10 + i)
        engine.adapters.register(f"p{i}", data=pack(bundle.path), pin=True)
    extra = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=12)
    with pytest.raises(FailedPrecondition, match="pinned"):
        engine.adapters.register("extra", data=pack(extra.path))
    assert all(engine.adapters.entries[f"p{i}"].resident for i in range(2))


def test_running_out_of_device_memory_is_resource_exhausted_and_the_engine_goes_on(
    engine, tiny_model, tmp_path
):
    """A CUDA out-of-memory error injected into the real UNet's forward pass and into a real
    adapter load: each answer says what to lower, and the engine serves what comes next."""

    def exhausted(*_, **__):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.pipe.unet.register_forward_pre_hook(exhausted)
    try:
        with pytest.raises(ResourceExhausted, match=r"ran out of memory for 1 image.*lower"):
            render(engine)
    finally:
        hook.remove()
    large = random_lora_bundle(str(tiny_model), tmp_path / "s", seed=2, rank=16)  # no slot
    load, engine.pipe.load_lora_weights = engine.pipe.load_lora_weights, exhausted
    try:
        with pytest.raises(ResourceExhausted, match=r"loading adapter 'large'.*unload"):
            engine.adapters.register("large", data=pack(large.path))
    finally:
        engine.pipe.load_lora_weights = load
    engine.adapters.register("large", data=pack(large.path))
    assert np.abs(render(engine, ("large", 1.0)) - stock(tiny_model, large)).mean() <= 1e-3
