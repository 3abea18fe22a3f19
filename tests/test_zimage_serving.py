"""Z-Image in the generator: the tiny Z-Image's images with LoRA files at per-request scales
equal stock diffusers' ZImagePipeline with the same files (``load_lora_weights`` +
``set_adapters``), alone, composed and in a mixed batch; img2img and inpainting equal
ZImageImg2ImgPipeline's and ZImageInpaintPipeline's; the gRPC server serves it end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.errors import FailedPrecondition
from loraforge_core.launch import ServerProcess
from loraforge_core.models import load_pipeline
from tests.helpers import load_bundles_into
from trainer_service.training.lora import random_lora_bundle

PROMPTS = {"z1": "a red circle", "z2": "a green square", "z3": "a blue triangle",
           "z4": "a red star", "base": "a blue circle"}  # fmt: skip
STEPS, GUIDANCE = 4, 4.0
TOLERANCE = 1e-3  # mean absolute pixel difference, as for the other families


@pytest.fixture(scope="module")
def bundles(tiny_zimage: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("zimage-bundles")
    return {name: random_lora_bundle(str(tiny_zimage), root, seed=i, std=0.5)
            for i, name in enumerate(("z1", "z2", "z3", "z4"))}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_zimage: Path, bundles: dict, tmp_path_factory: pytest.TempPathFactory):
    engine = build_engine(load_pipeline(str(tiny_zimage)), tmp_path_factory.mktemp("gen"),
                          slot_rank=8)  # fmt: skip
    for name, bundle in bundles.items():
        engine.adapters.register(name, data=pack(bundle.path))
    return engine


@pytest.fixture(scope="module")
def stock(tiny_zimage: Path, bundles: dict):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    return load_bundles_into(pipe, bundles)


def spec(prompt: str, adapters: list[tuple[str, float]], seed: int, **extra) -> GenerationSpec:
    return GenerationSpec(
        prompt=prompt, width=32, height=32, steps=STEPS, guidance_scale=GUIDANCE, seed=seed,
        adapters=[AdapterRequest(a, s) for a, s in adapters], **extra,
    )  # fmt: skip


def pixels(images) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(images[0].data)), dtype=np.float32) / 255


def stock_pixels(pipe, prompt: str, adapters, seed: int, **inputs) -> np.ndarray:
    names = [a for a, _ in adapters]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, [s for _, s in adapters])
    else:
        pipe.disable_lora()
    inputs = {"max_sequence_length": pipe.tokenizer.model_max_length,
              "guidance_scale": GUIDANCE, **inputs}  # fmt: skip
    image = pipe(
        prompt, num_inference_steps=STEPS, width=32, height=32,
        generator=torch.Generator().manual_seed(seed), **inputs,
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255


REQUESTS = [
    ("z1", [("z1", 1.0)], 1),
    ("z2", [("z2", 0.6)], 2),
    ("z1", [("z1", 0.8), ("z2", -0.5)], 3),  # two composed, scales of their own
    ("base", [], 4),
]


def test_zimage_images_equal_stock_diffusers_alone_and_composed(engine, stock):
    for prompt, adapters, seed in REQUESTS:
        want = stock_pixels(stock, PROMPTS[prompt], adapters, seed)
        ours = pixels(engine.generate(spec(PROMPTS[prompt], adapters, seed)))
        assert np.abs(want - ours).mean() <= TOLERANCE, (prompt, adapters)
    base = stock_pixels(stock, PROMPTS["z1"], [], 1)
    adapted = pixels(engine.generate(spec(PROMPTS["z1"], [("z1", 1.0)], 1)))
    assert np.abs(base - adapted).mean() > 1e-2  # the adapters act


def test_a_mixed_batch_of_four_zimage_adapters_equals_each_request_alone(engine):
    """Prompts of different lengths too: each keeps its own caption length in the batch."""
    requests = [spec(PROMPTS[f"z{i}"], [(f"z{i}", 0.4 + 0.3 * i)], i) for i in range(1, 5)]
    requests[0].prompt = "a red circle and a green square beside a blue triangle"
    requests[1].num_images = 2
    alone = [engine.generate(r) for r in requests]
    batched = engine.generate_batch([GenerationJob(r) for r in requests])
    for single, together in zip(alone, batched, strict=True):
        assert not isinstance(together, Exception), together
        assert len(together) == len(single)
        for a, b in zip(single, together, strict=True):
            assert np.abs(pixels([a]) - pixels([b])).mean() <= TOLERANCE
    firsts = [pixels(images) for images in alone]
    assert min(np.abs(a - b).mean() for i, a in enumerate(firsts) for b in firsts[i + 1 :]) > 1e-2


def test_unguided_zimage_requests_turbo_style_equal_stock_alone_and_batched(engine, stock):
    """Z-Image-Turbo runs at guidance 0 (no negative half): stock's image, alone and in a
    batch with another adapter's request."""
    import dataclasses

    requests = [
        dataclasses.replace(spec(PROMPTS["z1"], [("z1", 0.8)], 11), guidance_scale=0.0),
        dataclasses.replace(spec(PROMPTS["z4"], [("z4", 1.2)], 12), guidance_scale=0.0),
    ]
    batched = engine.generate_batch([GenerationJob(r) for r in requests])
    for request, together in zip(requests, batched, strict=True):
        assert not isinstance(together, Exception), together
        ((name, scale),) = [(a.adapter_id, a.scale) for a in request.adapters]
        want = stock_pixels(stock, request.prompt, [(name, scale)], request.seed,
                            guidance_scale=0.0)  # fmt: skip
        assert np.abs(pixels(together) - want).mean() <= TOLERANCE
        assert np.abs(pixels(engine.generate(request)) - want).mean() <= TOLERANCE


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_zimage_img2img_and_inpainting_equal_stock_pipelines(engine, stock, mode):
    import diffusers

    init = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    extra = {"init_image": init, "strength": 0.75}
    stock_inputs = {"image": init, "strength": 0.75}
    if mode == "inpaint":
        extra["mask_image"] = mask
        stock_inputs["mask_image"] = mask
    adapters = [("z3", 0.9)]
    ours = pixels(engine.generate(spec(PROMPTS["z3"], adapters, 5, **extra)))
    cls = {"img2img": diffusers.ZImageImg2ImgPipeline,
           "inpaint": diffusers.ZImageInpaintPipeline}[mode]  # fmt: skip
    want = stock_pixels(cls.from_pipe(stock), PROMPTS["z3"], adapters, 5, **stock_inputs)
    assert ours.shape == (32, 32, 3)
    assert np.abs(want - ours).mean() <= TOLERANCE


def test_a_flux_adapter_on_a_zimage_server_is_refused(engine, tiny_flux, tmp_path):
    bundle = random_lora_bundle(str(tiny_flux), tmp_path, seed=3)
    with pytest.raises(FailedPrecondition, match="made for 'flux' models; this server serves Z"):
        engine.adapters.register("flux-one", data=pack(bundle.path))


@pytest.mark.slow
def test_the_generator_serves_a_zimage_model_over_grpc(tiny_zimage, bundles, stock, tmp_path):
    from loraforge_client import GeneratorClient

    with (
        ServerProcess("generator", data_dir=tmp_path / "g", model=str(tiny_zimage)) as server,
        GeneratorClient(server.target) as client,
    ):
        for name in ("z1", "z2"):
            client.load_adapter(name, bundles[name].path)
        listed = {a.adapter_id: a.family for a in client.list_adapters()}
        assert listed == {"z1": "zimage", "z2": "zimage"}
        adapters = [("z1", 0.8), ("z2", -0.5)]
        images = client.generate(PROMPTS["z1"], adapters=adapters, steps=STEPS,
                                 guidance_scale=GUIDANCE, seed=3, width=32, height=32)  # fmt: skip
    ours = np.asarray(Image.open(io.BytesIO(images[0].data)), dtype=np.float32) / 255
    assert np.abs(stock_pixels(stock, PROMPTS["z1"], adapters, 3) - ours).mean() <= TOLERANCE


def published_zimage_loras(model: Path, folder: Path) -> dict[str, Path]:
    """One peft adapter (rank 4, alpha 8, on the attention and feed-forwards) saved as Z-Image
    LoRAs are published: diffusers' ``save_lora_weights`` (alpha in its metadata), ComfyUI's
    and ai-toolkit's ``diffusion_model.*.lora_A/B`` (alpha folded in) and musubi-tuner's
    kohya ``lora_unet_*.lora_down/up`` with ``.alpha``."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = ZImagePipeline.from_pretrained(model)
    torch.manual_seed(11)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2"]
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    state = get_peft_model_state_dict(pipe.transformer)
    ZImagePipeline.save_lora_weights(
        folder / "diffusers", transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    comfy = {f"diffusion_model.{k}": v * (2.0 if ".lora_B." in k else 1.0)
             for k, v in state.items()}  # fmt: skip
    kohya = {}
    for key, value in state.items():
        module, _, part = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(comfy, folder / "comfy.safetensors")
    save_file(kohya, folder / "kohya.safetensors")
    return {
        "diffusers": folder / "diffusers" / "pytorch_lora_weights.safetensors",
        "comfy": folder / "comfy.safetensors",
        "kohya": folder / "kohya.safetensors",
    }


@pytest.fixture(scope="module")
def published(tiny_zimage: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return published_zimage_loras(tiny_zimage, tmp_path_factory.mktemp("published"))


@pytest.mark.parametrize("form", ["diffusers", "comfy", "kohya"])
def test_published_zimage_loras_serve_as_stock_diffusers_loads_them(
    engine, tiny_zimage, published, form
):
    from diffusers import ZImagePipeline

    path = published[form]
    entry = engine.adapters.register(f"published-{form}", data=path.read_bytes())
    assert entry.family == "zimage"
    ours = pixels(engine.generate(spec(PROMPTS["base"], [(f"published-{form}", 0.7)], 9)))
    stock = ZImagePipeline.from_pretrained(tiny_zimage)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(path), adapter_name="published")
    want = stock_pixels(stock, PROMPTS["base"], [("published", 0.7)], 9)
    assert np.abs(want - ours).mean() <= TOLERANCE
    # The same adapter in every form: the diffusers file's image, and not the base model's.
    stock.load_lora_weights(str(published["diffusers"]), adapter_name="reference")
    reference = stock_pixels(stock, PROMPTS["base"], [("reference", 0.7)], 9)
    assert np.abs(reference - ours).mean() <= TOLERANCE
    assert np.abs(stock_pixels(stock, PROMPTS["base"], [], 9) - ours).mean() > 1e-2


def comfyui_lora_keys(config: dict) -> dict[str, tuple[str, int]]:
    """The LoRA keys ComfyUI's Lumina2 key map accepts for a Z-Image (comfy/lora.py's
    ``model_lora_keys_unet`` over comfy/utils.py's ``z_image_to_diffusers``), as
    ``diffusion_model.<diffusers module>`` -> (its native weight, offset into it: q, k and v
    share one fused qkv)."""
    dim, keys = config["dim"], {}
    blocks = [f"layers.{i}" for i in range(config["n_layers"])] + [
        f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner")
        for i in range(config["n_refiner_layers"])
    ]  # fmt: skip
    for block in blocks:
        for offset, name in enumerate(("to_q", "to_k", "to_v")):
            keys[f"{block}.attention.{name}"] = (f"{block}.attention.qkv.weight", offset * dim)
        keys[f"{block}.attention.to_out.0"] = (f"{block}.attention.out.weight", 0)
        for w in ("w1", "w2", "w3"):
            keys[f"{block}.feed_forward.{w}"] = (f"{block}.feed_forward.{w}.weight", 0)
        if not block.startswith("context_refiner"):  # ComfyUI's context refiner has none
            keys[f"{block}.adaLN_modulation.0"] = (f"{block}.adaLN_modulation.0.weight", 0)
    return {f"diffusion_model.{k}": v for k, v in keys.items()}


def test_the_zimage_export_is_what_comfyui_maps_and_reads_back_exactly(
    engine, tiny_zimage, bundles, stock, tmp_path
):
    """``export --format kohya`` writes the names ComfyUI maps (each layer's down, up and
    alpha), and stock diffusers and our import read the file back as the bundle."""
    import json

    from diffusers import ZImagePipeline
    from safetensors.torch import save_file

    from loraforge_core import interop

    bundle = bundles["z2"]
    state, metadata = interop.export_kohya(bundle)
    config = json.loads((tiny_zimage / "transformer" / "config.json").read_text())
    accepted = comfyui_lora_keys(config)
    layers = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert layers and layers <= set(accepted), sorted(layers - set(accepted))[:3]
    for layer in layers:
        assert state[f"{layer}.alpha"].item() == state[f"{layer}.lora_down.weight"].shape[0]
    assert metadata["ss_base_model_version"] == "z_image"
    path = tmp_path / "exported.safetensors"
    save_file(state, path, metadata=metadata)

    want = stock_pixels(stock, PROMPTS["z2"], [("z2", 0.9)], 8)
    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="exported")
    assert (
        np.abs(stock_pixels(pipe, PROMPTS["z2"], [("exported", 0.9)], 8) - want).mean() <= TOLERANCE
    )
    engine.adapters.register("reimported", data=path.read_bytes())
    ours = pixels(engine.generate(spec(PROMPTS["z2"], [("reimported", 0.9)], 8)))
    assert np.abs(ours - want).mean() <= TOLERANCE
