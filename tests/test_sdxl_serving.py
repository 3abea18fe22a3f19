"""SDXL in the generator: the tiny SDXL's images with LoRA files and learned tokens at
per-request scales equal stock diffusers' StableDiffusionXLPipeline with the same files, alone,
composed and in a mixed batch (UNet and both text encoders adapted, each token's ``clip_l`` and
``clip_g`` vectors loaded into both encoders)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_service.engine import build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.errors import FailedPrecondition
from loraforge_core.models import load_pipeline
from tests.helpers import load_bundles_into
from trainer_service.training.lora import random_lora_bundle

PROMPTS = {"s1": "a <x1> circle", "s2": "a green <x2>", "base": "a blue triangle"}
STEPS, GUIDANCE = 4, 5.0


@pytest.fixture(scope="module")
def bundles(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sdxl-bundles")
    return {name: random_lora_bundle(str(tiny_sdxl), root, seed=i, token=f"<x{i + 1}>")
            for i, name in enumerate(("s1", "s2"))}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_sdxl: Path, bundles: dict, tmp_path_factory: pytest.TempPathFactory):
    engine = build_engine(load_pipeline(str(tiny_sdxl)), tmp_path_factory.mktemp("gen"))
    for name, bundle in bundles.items():
        engine.adapters.register(name, data=pack(bundle.path))
    return engine


@pytest.fixture(scope="module")
def stock(tiny_sdxl: Path, bundles: dict):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    return load_bundles_into(pipe, bundles)


def spec(prompt: str, adapters: list[tuple[str, float, float | None]], seed: int):
    return GenerationSpec(
        prompt=prompt, width=32, height=32, steps=STEPS, guidance_scale=GUIDANCE, seed=seed,
        adapters=[AdapterRequest(a, s, t) for a, s, t in adapters],
    )  # fmt: skip


def pixels(images) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(images[0].data)), dtype=np.float32) / 255


def use_adapters(pipe, adapters: list[tuple[str, float, float | None]]) -> None:
    """Exactly ``adapters`` active on the stock pipeline (the module shares it, so every test
    states its whole adapter setting: set_adapters alone does not undo a disable_lora)."""
    names = [a for a, _, _ in adapters]
    weights = [
        {"unet": s, "text_encoder": s if t is None else t, "text_encoder_2": s if t is None else t}
        for _, s, t in adapters
    ]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    else:
        pipe.disable_lora()


def stock_pixels(pipe, prompt: str, adapters, seed: int) -> np.ndarray:
    use_adapters(pipe, adapters)
    image = pipe(
        prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=32, height=32,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255


REQUESTS = [
    ("s1", [("s1", 1.0, None)], 1),
    ("s2", [("s2", 0.6, 1.4)], 2),
    ("s1", [("s1", 0.8, 0.0), ("s2", -0.5, None)], 3),  # two composed
    ("base", [], 4),
]


def test_sdxl_images_equal_stock_diffusers_alone_composed_and_batched(engine, stock):
    expected = [stock_pixels(stock, PROMPTS[p], a, seed) for p, a, seed in REQUESTS]
    requests = [spec(PROMPTS[p], a, seed) for p, a, seed in REQUESTS]
    alone = [pixels(engine.generate(r)) for r in requests]
    batched = engine.generate_batch([GenerationJob(r) for r in requests])
    for want, single, together in zip(expected, alone, batched, strict=True):
        assert not isinstance(together, Exception), together
        assert np.abs(want - single).mean() <= 1e-3
        assert np.abs(want - pixels(together)).mean() <= 1e-3
    # The adapters act: an adapted render is not the base model's.
    base = stock_pixels(stock, PROMPTS["s1"], [], 1)
    assert np.abs(base - alone[0]).mean() > 1e-2


def test_an_sd_adapter_on_an_sdxl_server_is_refused(engine, tiny_model, tmp_path):
    bundle = random_lora_bundle(str(tiny_model), tmp_path, seed=3)
    with pytest.raises(FailedPrecondition, match="made for 'sd' models"):
        engine.adapters.register("sd-one", data=pack(bundle.path))


def test_sdxl_kohya_export_loads_in_stock_diffusers_and_imports_back(
    engine, stock, bundles, tiny_sdxl, tmp_path
):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from loraforge_core import interop

    state, metadata = interop.export_kohya(bundles["s1"])
    prefixes = {key.split("_", 2)[1] for key in state}  # lora_<te1|te2|unet>_...
    assert prefixes == {"unet", "te1", "te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    path = tmp_path / "s1-kohya.safetensors"
    save_file(state, path, metadata=metadata)
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(path), adapter_name="s1")  # the file as written
    adapters, prompt = [("s1", 1.0, None)], "a red circle"  # the LoRA alone: no token
    want = stock_pixels(stock, prompt, adapters, 5)
    assert np.abs(stock_pixels(fresh, prompt, adapters, 5) - want).mean() <= 1e-3
    # Imported back through the generator: the same adapter, recorded as SDXL.
    engine.adapters.register("s1-kohya", data=path.read_bytes())
    imported = engine.generate(spec(prompt, [("s1-kohya", 1.0, None)], 5))
    assert np.abs(pixels(imported) - want).mean() <= 1e-3


def sgm_names(state: dict, layers_per_block: int) -> dict:
    """kohya keys as sd-scripts writes SDXL files: the UNet's attention blocks under SGM names
    (``input_blocks_4_1``, ``middle_block_1``, ``output_blocks_0_1``), not diffusers'."""
    block = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_(?:(\d+)_)?attentions_(\d+)_")

    def rename(match: re.Match) -> str:
        kind, index, layer = match.group(1), int(match.group(2) or 0), int(match.group(3))
        if kind == "mid_block":
            return "lora_unet_middle_block_1_"
        if kind == "down_blocks":
            return f"lora_unet_input_blocks_{1 + index * (layers_per_block + 1) + layer}_1_"
        return f"lora_unet_output_blocks_{index * (layers_per_block + 1) + layer}_1_"

    return {block.sub(rename, key): value for key, value in state.items()}


def test_a_kohya_sdxl_file_with_sgm_block_names_and_bundled_tokens_imports(
    engine, stock, bundles, tmp_path
):
    from safetensors.torch import save_file

    from loraforge_core import interop

    state, metadata = interop.export_kohya(bundles["s2"], bundle_embeddings=True)
    renamed = sgm_names(state, engine.pipe.unet.config.layers_per_block)
    assert any("_input_blocks_" in key for key in renamed)
    assert not any("_down_blocks_" in key or "_up_blocks_" in key for key in renamed)
    assert {"bundle_emb.<x2>.clip_l", "bundle_emb.<x2>.clip_g"} <= set(renamed)
    path = tmp_path / "s2-sgm.safetensors"
    save_file(renamed, path, metadata=metadata)
    engine.adapters.register("s2-sgm", data=path.read_bytes())
    adapters = [("s2", 0.7, None)]
    imported = engine.generate(spec(PROMPTS["s2"], [("s2-sgm", 0.7, None)], 8))
    assert np.abs(pixels(imported) - stock_pixels(stock, PROMPTS["s2"], adapters, 8)).mean() <= 1e-3
    # A token with its CLIP-G vector missing is refused, naming both widths.
    del renamed["bundle_emb.<x2>.clip_g"]
    save_file(renamed, path, metadata=metadata)
    with pytest.raises(FailedPrecondition, match=r"<x2> has vectors of \[32\] dimensions"):
        engine.adapters.register("s2-half", data=path.read_bytes())


def test_sdxl_tokens_export_as_clip_l_and_clip_g_embedding_files(bundles):
    from loraforge_core import interop

    ((stem, tensors),) = interop.export_embeddings(bundles["s1"]).items()
    assert stem == "x1" and sorted(tensors) == ["clip_g", "clip_l"]
    vectors = bundles["s1"].token_vectors()["<x1>"]
    assert torch.equal(tensors["clip_l"][0], vectors[0])
    assert torch.equal(tensors["clip_g"][0], vectors[1])


def test_sdxl_img2img_equals_stock_diffusers_with_the_adapter(engine, stock):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from loraforge_core import toyworld

    init = toyworld.render("green", "square")
    request = spec(PROMPTS["s1"], [("s1", 0.9, None)], 6)
    request.init_image, request.strength = init, 0.6
    ours = pixels(engine.generate(request))
    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(stock)
    use_adapters(pipe, [("s1", 0.9, None)])
    image = pipe(
        PROMPTS["s1"], image=init, strength=0.6, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(6),
    ).images[0]  # fmt: skip
    assert np.abs(ours - np.asarray(image, dtype=np.float32) / 255).mean() <= 1e-3


def test_sdxl_inpainting_equals_stock_diffusers_with_the_adapter(engine, stock):
    from diffusers import StableDiffusionXLInpaintPipeline

    from loraforge_core import toyworld

    init = toyworld.render("green", "square")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    request = spec(PROMPTS["s2"], [("s2", 0.8, 1.2)], 9)
    request.init_image, request.mask_image = init, mask
    ours = pixels(engine.generate(request))
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(stock)
    use_adapters(pipe, [("s2", 0.8, 1.2)])
    image = pipe(
        PROMPTS["s2"], image=init, mask_image=mask, strength=1.0, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, width=32, height=32, generator=torch.Generator().manual_seed(9),
    ).images[0]  # fmt: skip
    assert np.abs(ours - np.asarray(image, dtype=np.float32) / 255).mean() <= 1e-3
    # The adapter acts on inpainting too.
    request.adapters = []
    assert np.abs(ours - pixels(engine.generate(request))).mean() > 1e-2


def test_an_fp16_sdxl_vae_runs_the_strength_zero_round_trip_in_float32(engine) -> None:
    """SDXL's VAE overflows in fp16 (its config says ``force_upcast``); the pipelines decode in
    float32, and so must the shortcut that returns the init image at strength 0."""
    from loraforge_core import toyworld

    vae = engine.pipe.vae
    assert vae.config.force_upcast
    request = spec(PROMPTS["base"], [], 10)
    request.init_image, request.strength = toyworld.render("red", "circle"), 0.0
    engine.generate(request)  # the img2img pipeline is made (from_pipe casts to the UNet's)
    seen: list[torch.dtype] = []
    hook = vae.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    vae.to(torch.float16)
    try:
        engine.generate(request)
        assert seen == [torch.float32] and vae.dtype == torch.float16
    finally:
        hook.remove()
        vae.to(torch.float32)
