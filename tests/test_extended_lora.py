"""Extended LoRA (lora_pti's use_extended_lora, "LoCon"): LoRA on the UNet's convolutions,
trained, served at per-request scales and in mixed batches, exported for kohya/A1111 tools and
imported back."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save

from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core import interop
from loraforge_core.bundle import pack, read_bundle, store_bundle
from loraforge_core.files import atomic_write_bytes
from loraforge_core.launch import ServerProcess, free_port
from loraforge_core.models import load_pipeline
from tests.helpers import shape_png
from trainer_service.config import TrainingConfig
from trainer_service.training.data import InstanceExample
from trainer_service.training.lora import random_lora_bundle
from trainer_service.training.trainer import RunPaths, Trainer

PROMPT = "a <c> circle"


def conv_keys(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".lora_")[0] for k, v in state.items() if v.ndim == 4}


@pytest.fixture(scope="module")
def conv_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("extended")
    return random_lora_bundle(str(tiny_model), root, seed=3, token="<c>", extended=True)


@pytest.fixture(scope="module", params=["extended", "default"])
def engine(request, tiny_model: Path, conv_bundle, tmp_path_factory: pytest.TempPathFactory):
    """Slots on extended LoRA's targets (the conv adapter loads by copy) or on the default ones
    (it takes diffusers' general path)."""
    root = tmp_path_factory.mktemp("extended-engine")
    engine = build_engine(load_pipeline(str(tiny_model)), root, max_resident=4, slot_rank=8,
                             extended_slots=request.param == "extended")  # fmt: skip
    engine.adapters.register("conv", data=pack(conv_bundle.path))
    plain = random_lora_bundle(str(tiny_model), root / "in", seed=4, token="<d>")
    engine.adapters.register("plain", data=pack(plain.path))
    engine.adapters.register("conv-linear", data=pack(linear_part(conv_bundle, root).path))
    loaded = engine.adapters.entries["conv"].peft_name
    assert loaded.startswith("slot-" if request.param == "extended" else "adapter-")
    return engine


def linear_part(bundle, root: Path):
    """The same adapter without its convolutions' LoRA (its linear layers and token only)."""
    state = bundle.lora_state_dict()
    convolutions = conv_keys(state)
    linear = {k: v for k, v in state.items() if k.split(".lora_")[0] not in convolutions}
    assert convolutions and linear
    return store_bundle(root / "linear", linear, bundle.embeddings(), bundle.manifest)


def spec(adapters, seed: int = 1, prompt: str = PROMPT) -> GenerationSpec:
    return GenerationSpec(prompt, width=32, height=32, steps=4, guidance_scale=5.0, seed=seed,
                          adapters=[AdapterRequest(*a) for a in adapters])  # fmt: skip


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(i.data)), dtype=np.float32) / 255 for i in images]


def stock_render(tiny_model: Path, lora_file, scale: float, bundle) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file), adapter_name="x")
    pipe.set_adapters(["x"], [scale])
    pipe.load_textual_inversion(list(bundle.embeddings().values()), token=["<c>"])
    image = pipe(PROMPT, width=32, height=32, num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255


def test_training_with_extended_lora_trains_the_convolutions(tiny_model: Path, tmp_path: Path):
    image = Image.open(io.BytesIO(shape_png())).convert("RGB")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), max_train_steps_ti=2,
        max_train_steps_tuning=3, gradient_accumulation_steps=1, save_steps=100, seed=0,
        device="cpu", use_extended_lora=True,
    )  # fmt: skip
    paths = RunPaths(tmp_path / "ckpt", tmp_path / "art")
    bundle = Trainer(config, [InstanceExample(image, "a.png")], paths).run()
    assert bundle is not None
    trained = conv_keys(bundle.lora_state_dict())
    assert "unet.down_blocks.0.resnets.0.conv1" in trained
    assert "unet.down_blocks.0.downsamplers.0.conv" in trained
    assert "conv1" in bundle.manifest.unet_target_modules
    # B starts at zero; three steps moved every convolution's B.
    ups = {k: v for k, v in bundle.lora_state_dict().items() if "conv1.lora_B" in k}
    assert ups and all(v.abs().sum() > 0 for v in ups.values())


@pytest.mark.parametrize("scale", [0.8, -0.5])
def test_served_like_stock_diffusers_at_each_scale(engine, conv_bundle, tiny_model, scale):
    ours = pixels(engine.generate(spec([("conv", scale)])))[0]
    assert np.abs(ours - stock_render(tiny_model, conv_bundle.lora_path, scale, conv_bundle)).mean(
    ) <= 1e-3  # fmt: skip
    # The convolutions' LoRA acts: the same adapter without it renders another image.
    linear_only = pixels(engine.generate(spec([("conv-linear", scale)])))[0]
    assert np.abs(ours - linear_only).mean() > 1e-2


def test_mixed_batches_with_conv_lora_give_each_request_its_own_image(engine):
    specs = [
        spec([("conv", 0.9)], seed=1),
        spec([("plain", 0.7)], seed=2, prompt="a <d> square"),
        spec([("conv", -0.4), ("plain", 1.1)], seed=3, prompt="a <c> and a <d>"),
        spec([], seed=4),
    ]
    alone = [pixels(engine.generate(s))[0] for s in specs]
    together = engine.generate_batch([GenerationJob(s) for s in specs])
    for single, outcome in zip(alone, together, strict=True):
        assert np.abs(pixels(outcome)[0] - single).mean() <= 1e-3


def test_a_slot_applies_only_the_layers_its_adapter_has(engine):
    """A plain adapter in an extended slot adds no convolution work: the mixer skips the
    slot's zero layers; the conv adapter's set reaches the convolutions."""
    mixer, unet = engine.mixer, engine.pipe.unet
    convolutions = [layer for layer in mixer.layers["unet"]
                    if isinstance(layer.base_layer, torch.nn.Conv2d)]  # fmt: skip
    assert convolutions
    for adapter_id, expected in (("plain", False), ("conv", True)):
        mixer.set("unet", {engine.adapters.entries[adapter_id].peft_name: 1.0})
        assert {layer.mix_plan is not None for layer in convolutions} == {expected}, adapter_id
        mixer.clear()
    assert unet.down_blocks[0].resnets[0].conv1.mix_plan is None


@pytest.mark.slow
def test_the_server_flag_puts_conv_adapters_in_slots(tiny_model, conv_bundle, tmp_path):
    """--adapter-slot-targets extended reaches the engine: the LoCon adapter loads by copy,
    which the outside-slots gauge (an operator's sign of slow loads) shows."""
    from loraforge_client import GeneratorClient

    port = free_port()
    with (
        ServerProcess("generator", data_dir=tmp_path, model=str(tiny_model), extra_args=[
            "--adapter-slot-targets", "extended", "--metrics-port", str(port)]) as server,
        GeneratorClient(server.target) as client,
    ):  # fmt: skip
        client.load_adapter("conv", conv_bundle.path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
    assert "loraforge_generator_adapters_resident 1.0" in metrics
    assert "loraforge_generator_adapters_outside_slots 0.0" in metrics


def test_kohya_export_loads_in_stock_diffusers_and_imports_back(conv_bundle, tiny_model, tmp_path):
    state, metadata = interop.export_kohya(conv_bundle)
    conv = [k for k, v in state.items() if v.ndim == 4]
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in conv
    assert metadata["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "4"}'
    exported = tmp_path / "locon.safetensors"
    atomic_write_bytes(exported, save(state, metadata=metadata))
    original = stock_render(tiny_model, conv_bundle.lora_path, 1.0, conv_bundle)
    assert np.abs(stock_render(tiny_model, exported, 1.0, conv_bundle) - original).mean() <= 1e-3
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    imported = interop.import_file(exported, pipe, tmp_path / "store", base_model=str(tiny_model))
    assert conv_keys(imported.lora_state_dict()) == conv_keys(conv_bundle.lora_state_dict())
    assert read_bundle(imported.path).manifest.method == "import:kohya"
