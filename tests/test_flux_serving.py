"""FLUX.1 in the generator: the tiny FLUX's images with LoRA files and learned tokens at
per-request scales equal stock diffusers' FluxPipeline with the same files (``load_lora_weights``
+ ``set_adapters``, tokens through ``load_textual_inversion`` into CLIP-L and T5), alone,
composed and in a mixed batch; img2img and inpainting equal FluxImg2ImgPipeline's and
FluxInpaintPipeline's; the gRPC server serves a FLUX base end to end."""

from __future__ import annotations

import dataclasses
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

PROMPTS = {"f1": "a <y1> circle", "f2": "a green <y2>", "f3": "a red <y3>", "f4": "a <y4> star",
           "base": "a blue triangle"}  # fmt: skip
STEPS, GUIDANCE = 4, 3.5  # FLUX.1-dev's guidance is an input of the transformer
TOLERANCE = 1e-3  # mean absolute pixel difference, as for SD and SDXL


@pytest.fixture(scope="module")
def bundles(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("flux-bundles")
    return {name: random_lora_bundle(str(tiny_flux), root, seed=i, token=f"<y{i + 1}>", std=0.5)
            for i, name in enumerate(("f1", "f2", "f3", "f4"))}  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_flux: Path, bundles: dict, tmp_path_factory: pytest.TempPathFactory):
    engine = build_engine(load_pipeline(str(tiny_flux)), tmp_path_factory.mktemp("gen"),
                          slot_rank=8)  # fmt: skip
    for name, bundle in bundles.items():
        engine.adapters.register(name, data=pack(bundle.path))
    return engine


@pytest.fixture(scope="module")
def stock(tiny_flux: Path, bundles: dict):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    return load_bundles_into(pipe, bundles)


def spec(prompt: str, adapters: list[tuple[str, float, float | None]], seed: int, **extra):
    return GenerationSpec(
        prompt=prompt, width=32, height=32, steps=STEPS, guidance_scale=GUIDANCE, seed=seed,
        adapters=[AdapterRequest(a, s, t) for a, s, t in adapters], **extra,
    )  # fmt: skip


def pixels(images) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(images[0].data)), dtype=np.float32) / 255


def use_adapters(pipe, adapters: list[tuple[str, float, float | None]]) -> None:
    """Exactly ``adapters`` active on the stock pipeline (diffusers adapts FLUX's transformer
    and CLIP-L; T5 carries no LoRA)."""
    names = [a for a, _, _ in adapters]
    weights = [{"transformer": s, "text_encoder": s if t is None else t} for _, s, t in adapters]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    else:
        pipe.disable_lora()


def stock_pixels(pipe, prompt: str, adapters, seed: int, **inputs) -> np.ndarray:
    use_adapters(pipe, adapters)
    inputs = {"max_sequence_length": pipe.tokenizer_2.model_max_length, **inputs}
    image = pipe(
        prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=32, height=32,
        generator=torch.Generator().manual_seed(seed), **inputs,
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255


REQUESTS = [
    ("f1", [("f1", 1.0, None)], 1),
    ("f2", [("f2", 0.6, 1.4)], 2),
    ("f1", [("f1", 0.8, 0.0), ("f2", -0.5, None)], 3),  # two composed, scales of their own
    ("base", [], 4),
]


def test_flux_images_equal_stock_diffusers_alone_and_composed(engine, stock):
    for prompt, adapters, seed in REQUESTS:
        want = stock_pixels(stock, PROMPTS[prompt], adapters, seed)
        ours = pixels(engine.generate(spec(PROMPTS[prompt], adapters, seed)))
        assert np.abs(want - ours).mean() <= TOLERANCE, (prompt, adapters)
    # The adapters act: an adapted render is not the base model's.
    base = stock_pixels(stock, PROMPTS["f1"], [], 1)
    adapted = pixels(engine.generate(spec(PROMPTS["f1"], [("f1", 1.0, None)], 1)))
    assert np.abs(base - adapted).mean() > 1e-2


def test_a_mixed_batch_of_four_flux_adapters_equals_each_request_alone(engine):
    requests = [spec(PROMPTS[f"f{i}"], [(f"f{i}", 0.4 + 0.3 * i, None)], i) for i in range(1, 5)]
    requests[1].num_images = 2
    alone = [engine.generate(r) for r in requests]
    batched = engine.generate_batch([GenerationJob(r) for r in requests])
    for single, together in zip(alone, batched, strict=True):
        assert not isinstance(together, Exception), together
        assert len(together) == len(single)
        for a, b in zip(single, together, strict=True):
            assert np.abs(pixels([a]) - pixels([b])).mean() <= TOLERANCE
    # Four different images: each row really had its own adapter.
    firsts = [pixels(images) for images in alone]
    assert min(np.abs(a - b).mean() for i, a in enumerate(firsts) for b in firsts[i + 1 :]) > 1e-2


def test_each_request_sets_its_t5_length_as_stock_does_and_batches_apart(engine, stock):
    """FLUX.1's transformer attends to every T5 position, padding included, so the length a
    prompt is encoded to changes the image; requests of different lengths share no batch."""
    from loraforge_core.errors import InvalidArgument

    adapters = [("f1", 0.8, None)]
    long, short = (
        spec(PROMPTS["f1"], adapters, 6, max_sequence_length=64),
        spec(PROMPTS["f1"], adapters, 6),
    )
    want = stock_pixels(stock, PROMPTS["f1"], adapters, 6, max_sequence_length=64)
    ours = pixels(engine.generate(long))
    assert np.abs(want - ours).mean() <= TOLERANCE
    default = pixels(engine.generate(short))  # the tiny model's own length: 32
    assert np.abs(default - ours).mean() > 1e-3
    batched = engine.generate_batch([GenerationJob(long), GenerationJob(short)])
    assert np.abs(pixels(batched[0]) - ours).mean() <= TOLERANCE
    assert np.abs(pixels(batched[1]) - default).mean() <= TOLERANCE
    with pytest.raises(InvalidArgument, match="at most 512 tokens; asked for 513"):
        engine.generate(dataclasses.replace(long, max_sequence_length=513))


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_flux_img2img_and_inpainting_equal_stock_pipelines(engine, stock, mode):
    import diffusers

    init = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    extra = {"init_image": init, "strength": 0.75}
    stock_inputs = {"image": init, "strength": 0.75}
    if mode == "inpaint":
        extra["mask_image"] = mask
        stock_inputs["mask_image"] = mask
    adapters = [("f3", 0.9, None)]
    ours = pixels(engine.generate(spec(PROMPTS["f3"], adapters, 5, **extra)))
    cls = {"img2img": diffusers.FluxImg2ImgPipeline, "inpaint": diffusers.FluxInpaintPipeline}
    want = stock_pixels(cls[mode].from_pipe(stock), PROMPTS["f3"], adapters, 5, **stock_inputs)
    assert ours.shape == (32, 32, 3)  # the size asked, not FluxImg2ImgPipeline's default
    assert np.abs(want - ours).mean() <= TOLERANCE


def test_an_sd_adapter_on_a_flux_server_is_refused(engine, tiny_model, tmp_path):
    bundle = random_lora_bundle(str(tiny_model), tmp_path, seed=3)
    with pytest.raises(FailedPrecondition, match="made for 'sd' models; this server serves FLUX"):
        engine.adapters.register("sd-one", data=pack(bundle.path))


@pytest.mark.slow
def test_the_generator_serves_a_flux_model_over_grpc(tiny_flux, bundles, stock, tmp_path):
    from loraforge_client import GeneratorClient

    with (
        ServerProcess("generator", data_dir=tmp_path / "g", model=str(tiny_flux)) as server,
        GeneratorClient(server.target) as client,
    ):
        for name in ("f1", "f2"):
            client.load_adapter(name, bundles[name].path)
        listed = {a.adapter_id: a.family for a in client.list_adapters()}
        assert listed == {"f1": "flux", "f2": "flux"}
        adapters = [("f1", 0.8, None), ("f2", -0.5, None)]
        images = client.generate(PROMPTS["f1"], adapters=[(a, s) for a, s, _ in adapters],
                                 steps=STEPS, guidance_scale=GUIDANCE, seed=3, width=32,
                                 height=32)  # fmt: skip
    ours = np.asarray(Image.open(io.BytesIO(images[0].data)), dtype=np.float32) / 255
    assert np.abs(stock_pixels(stock, PROMPTS["f1"], adapters, 3) - ours).mean() <= TOLERANCE


def published_flux_lora(model: Path, folder: Path) -> Path:
    """A FLUX LoRA as diffusers' trainers publish it: ``FluxPipeline.save_lora_weights`` of a
    peft adapter on the transformer and CLIP-L trained at alpha 2 x rank (diffusers records
    the alpha in the file's metadata)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(model)
    torch.manual_seed(11)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights="gaussian",
        target_modules=["attn.to_q", "attn.to_v", "ff.net.0.proj", "proj_mlp"],
    )
    pipe.transformer.add_adapter(config)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    FluxPipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    return folder / "pytorch_lora_weights.safetensors"


def test_a_published_flux_lora_file_serves_as_stock_diffusers_loads_it(engine, tiny_flux, tmp_path):
    """A .safetensors sent to LoadAdapter is converted by diffusers' own FLUX converter and
    read back with its alpha folded in: the images equal stock load_lora_weights of the file."""
    from diffusers import FluxPipeline

    path = published_flux_lora(tiny_flux, tmp_path)
    entry = engine.adapters.register("published", data=path.read_bytes())
    assert entry.family == "flux"
    ours = pixels(engine.generate(spec(PROMPTS["base"], [("published", 0.7, None)], 9)))
    stock = FluxPipeline.from_pretrained(tiny_flux)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(path), adapter_name="published")
    want = stock_pixels(stock, PROMPTS["base"], [("published", 0.7, None)], 9)
    base = stock_pixels(stock, PROMPTS["base"], [], 9)
    assert np.abs(want - ours).mean() <= TOLERANCE
    assert np.abs(base - ours).mean() > 1e-2  # the file's alpha (2x) made it through


def kohya_bfl_flux_lora(model: Path, folder: Path) -> Path:
    """A FLUX LoRA as kohya sd-scripts saves it: BFL's fused layer names
    (``lora_unet_double_blocks_{i}_img_attn_qkv``, ...), ``lora_down``/``lora_up`` and an
    ``alpha`` of 2 x rank; every layer of both block kinds but the single blocks' fused
    ``linear1``, which diffusers' converter splits at FLUX.1's widths (3072 and 12288)."""
    import json

    from safetensors.torch import save_file

    config = json.loads((model / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * inner  # FLUX.1's mlp_ratio
    shapes: dict[str, tuple[int, int]] = {}  # layer -> (in, out)
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            prefix = f"lora_unet_double_blocks_{i}_{stream}"
            shapes |= {
                f"{prefix}_attn_qkv": (inner, 3 * inner), f"{prefix}_attn_proj": (inner, inner),
                f"{prefix}_mlp_0": (inner, mlp), f"{prefix}_mlp_2": (mlp, inner),
                f"{prefix}_mod_lin": (inner, 6 * inner),
            }  # fmt: skip
    for i in range(config["num_single_layers"]):
        prefix = f"lora_unet_single_blocks_{i}"
        shapes |= {f"{prefix}_linear2": (inner + mlp, inner),
                   f"{prefix}_modulation_lin": (inner, 3 * inner)}  # fmt: skip
    generator, rank, tensors = torch.Generator().manual_seed(13), 4, {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0 * rank)
    path = folder / "kohya_bfl.safetensors"
    save_file(tensors, path)
    return path


def xlabs_flux_lora(model: Path, folder: Path) -> Path:
    """A FLUX LoRA as XLabs' trainer saves it: ``double_blocks.{i}.processor.qkv_lora1`` (the
    image stream's fused q, k, v), ``proj_lora1``, ``qkv_lora2`` and ``proj_lora2`` (the text
    stream's), ``single_blocks.{i}.processor.qkv_lora`` and ``proj_lora``; ``down``/``up``."""
    import json

    from safetensors.torch import save_file

    config = json.loads((model / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(config["num_layers"]):
        for stream in ("1", "2"):  # image, text
            processor = f"double_blocks.{i}.processor"
            shapes |= {f"{processor}.qkv_lora{stream}": (inner, 3 * inner),
                       f"{processor}.proj_lora{stream}": (inner, inner)}  # fmt: skip
    for i in range(config["num_single_layers"]):
        shapes |= {f"single_blocks.{i}.processor.qkv_lora": (inner, 3 * inner),
                   f"single_blocks.{i}.processor.proj_lora": (5 * inner, inner)}  # fmt: skip
    generator, rank, tensors = torch.Generator().manual_seed(14), 4, {}
    for name, (fan_in, fan_out) in shapes.items():  # attention only: larger factors than kohya's
        tensors[f"{name}.down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
        tensors[f"{name}.up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.5
    path = folder / "xlabs.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("make", [kohya_bfl_flux_lora, xlabs_flux_lora], ids=["kohya", "xlabs"])
def test_flux_files_in_bfl_names_serve_as_stock_diffusers_loads_them(
    engine, tiny_flux, tmp_path, make
):
    """kohya sd-scripts' and XLabs' FLUX.1 files name BFL's fused layers; diffusers' own
    converter splits them, on import as in stock load_lora_weights."""
    from diffusers import FluxPipeline

    path = make(tiny_flux, tmp_path)
    name = path.stem.replace("_", "-")
    entry = engine.adapters.register(name, data=path.read_bytes())
    assert entry.family == "flux"
    ours = pixels(engine.generate(spec(PROMPTS["base"], [(name, 0.6, None)], 8)))
    stock = FluxPipeline.from_pretrained(tiny_flux)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(path), adapter_name=name)
    want = stock_pixels(stock, PROMPTS["base"], [(name, 0.6, None)], 8)
    base = stock_pixels(stock, PROMPTS["base"], [], 8)
    assert np.abs(want - ours).mean() <= TOLERANCE
    assert np.abs(base - ours).mean() > 1e-2


# What ComfyUI (comfy/utils.py flux_to_diffusers, comfy/lora.py model_lora_keys_unet and
# model_lora_keys_clip) maps for a FLUX model, read from its code: per double block and per
# single block these diffusers modules (q, k, v and the MLP input land at their offsets in
# the fused BFL layers), each as "lora_transformer_" + the name with "_" for "."; CLIP-L's
# layers as "lora_te1_text_model_encoder_layers_{i}_{mlp_fc1|...|self_attn_out_proj}".
COMFY_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_out.0", "norm1.linear", "norm1_context.linear",
                "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")  # fmt: skip
COMFY_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")
COMFY_CLIP = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj",
              "self_attn_out_proj")  # fmt: skip


def comfyui_flux_keys(layers: int, single_layers: int, clip_layers: int) -> set[str]:
    keys = {f"lora_transformer_transformer_blocks_{i}_{m.replace('.', '_')}"
            for i in range(layers) for m in COMFY_DOUBLE}  # fmt: skip
    keys |= {f"lora_transformer_single_transformer_blocks_{i}_{m.replace('.', '_')}"
             for i in range(single_layers) for m in COMFY_SINGLE}  # fmt: skip
    return keys | {f"lora_te1_text_model_encoder_layers_{i}_{m}"
                   for i in range(clip_layers) for m in COMFY_CLIP}  # fmt: skip


def test_kohya_export_of_a_flux_bundle_maps_key_for_key_in_comfyui_and_round_trips(
    engine, bundles, tmp_path
):
    from safetensors.torch import load_file, save_file

    from loraforge_core.bundle import read_bundle
    from loraforge_core.interop import export_kohya, import_file

    bundle = bundles["f1"]
    state, metadata = export_kohya(bundle, bundle_embeddings=True)
    modules = {k.split(".", 1)[0] for k in state if not k.startswith("bundle_emb.")}
    config = engine.pipe.transformer.config
    expected = comfyui_flux_keys(config.num_layers, config.num_single_layers,
                                 engine.pipe.text_encoder.config.num_hidden_layers)  # fmt: skip
    assert modules and modules <= expected, sorted(modules - expected)
    for module in modules:  # kohya's "regular" form, which ComfyUI's load_lora reads
        parts = ("lora_down.weight", "lora_up.weight", "alpha")
        assert {f"{module}.{part}" for part in parts} <= set(state)
    assert metadata["ss_base_model_version"] == "flux1"
    # Back in: the same tensors and tokens, exactly; a layer written at alpha = rank / 2 with
    # its up matrix doubled (as other trainers write them) reads as the same layer.
    layer = sorted(modules)[0]
    state[f"{layer}.alpha"] = state[f"{layer}.alpha"] / 2
    state[f"{layer}.lora_up.weight"] = state[f"{layer}.lora_up.weight"] * 2
    save_file(state, tmp_path / "kohya.safetensors", metadata=metadata)
    imported = import_file(tmp_path / "kohya.safetensors", engine.pipe, tmp_path / "store",
                           base_model="tiny-flux")  # fmt: skip
    original, again = load_file(bundle.lora_path), load_file(imported.lora_path)
    assert sorted(again) == sorted(original)
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert imported.manifest.family == "flux" and imported.manifest.tokens == ["<y1>"]
    vectors = read_bundle(imported.path).token_vectors()["<y1>"]
    for ours, theirs in zip(vectors, bundle.token_vectors()["<y1>"], strict=True):
        assert torch.equal(ours, theirs)


def test_a_flux_request_gets_flux_dev_guidance_by_default_and_only_its_own_scheduler(engine, stock):
    from inference_service.spec import SCHEDULERS
    from loraforge_core.errors import InvalidArgument

    unset = spec(PROMPTS["base"], [], 4)
    unset.guidance_scale = None  # as a request that sets none arrives
    ours = pixels(engine.generate(unset))
    assert np.abs(stock_pixels(stock, PROMPTS["base"], [], 4) - ours).mean() <= TOLERANCE  # 3.5
    sd_default = pixels(engine.generate(dataclasses.replace(unset, guidance_scale=7.5)))
    assert np.abs(sd_default - ours).mean() > 1e-3  # the guidance input matters
    for name in set(SCHEDULERS) - {"default"}:
        with pytest.raises(InvalidArgument, match=r"FLUX\.1 models run default only"):
            engine.generate(dataclasses.replace(unset, scheduler=name))


def test_a_kohya_single_block_linear1_splits_into_q_k_v_and_mlp_at_flux1_widths(tmp_path):
    """kohya's fused ``lora_unet_single_blocks_{i}_linear1`` (q, k, v and the MLP input in one
    layer) imports only at FLUX.1's widths, where diffusers' converter splits it (3072 x 3 +
    12288 rows): on one single block of FLUX.1-dev's width, each part of the bundle is exactly
    its rows of the file's delta, alpha applied."""
    from safetensors.torch import save_file

    from loraforge_core import interop
    from loraforge_core.families import flux
    from loraforge_core.lora_format import lora_pairs

    width = {"num_layers": 0, "num_single_layers": 1, "attention_head_dim": 128,
             "num_attention_heads": 24, "axes_dims_rope": [16, 56, 56]}  # fmt: skip
    architecture = {**flux.TINY_FLUX, "transformer": {**flux.TINY_FLUX["transformer"], **width}}
    pipe = flux.build_tiny(0, architecture)
    inner, mlp, rank = 3072, 12288, 4
    generator = torch.Generator().manual_seed(15)
    down = torch.randn(rank, inner, generator=generator) * 0.1
    up = torch.randn(3 * inner + mlp, rank, generator=generator) * 0.1
    name = "lora_unet_single_blocks_0_linear1"
    path = tmp_path / "linear1.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(2.0 * rank)}, path)  # fmt: skip
    bundle = interop.import_file(path, pipe, tmp_path / "store", base_model="wide")
    pairs = lora_pairs(bundle.lora_state_dict())
    delta = up @ down * 2.0  # alpha / rank
    parts = {
        "attn.to_q": slice(0, inner), "attn.to_k": slice(inner, 2 * inner),
        "attn.to_v": slice(2 * inner, 3 * inner), "proj_mlp": slice(3 * inner, None),
    }  # fmt: skip
    assert {module for _, module in pairs} == {f"single_transformer_blocks.0.{p}" for p in parts}
    for part, rows in parts.items():
        a, b = pairs["transformer", f"single_transformer_blocks.0.{part}"]
        torch.testing.assert_close(b @ a, delta[rows], rtol=1e-4, atol=1e-5)
