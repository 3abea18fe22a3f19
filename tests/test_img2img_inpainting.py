"""img2img and inpainting on the warm pipeline's modules, with adapters at per-request scales:
the images equal stock diffusers' pipelines with the same LoRA file, and mix in one batch."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from loraforge.v1 import generator_pb2, generator_pb2_grpc
from PIL import Image

from inference_service.engine import GeneratorEngine, build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core import toyworld
from loraforge_core.bundle import pack, read_bundle
from loraforge_core.launch import ServerProcess
from loraforge_core.models import load_pipeline, resolve_model
from trainer_service.training.lora import random_lora_bundle

INIT = toyworld.render("green", "square")
MASK = Image.new("L", (32, 32), 0)
MASK.paste(255, (8, 8, 24, 24))  # repaint the middle
PROMPT = "a red <t0> circle"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("i2i-bundles")
    model = resolve_model("")  # the toy-world base: its VAE reconstructs toy images
    return [random_lora_bundle(model, root, seed=i, token=f"<t{i}>") for i in range(2)]


@pytest.fixture(scope="module")
def engine(bundles, tmp_path_factory: pytest.TempPathFactory) -> GeneratorEngine:
    engine = build_engine(load_pipeline(""), tmp_path_factory.mktemp("i2i"), max_resident=4)
    for i, bundle in enumerate(bundles):
        engine.adapters.register(f"a{i}", data=pack(bundle.path))
    return engine


def spec(prompt: str = PROMPT, adapters=(("a0", 0.7),), seed: int = 1, **image) -> GenerationSpec:
    return GenerationSpec(
        prompt, width=32, height=32, steps=10, guidance_scale=5.0, seed=seed,
        adapters=[AdapterRequest(a, s) for a, s in adapters], **image,
    )  # fmt: skip


def render(engine: GeneratorEngine, spec: GenerationSpec) -> np.ndarray:
    return pixels(engine.generate(spec)[0].data)


def stock(cls, bundle, scale: float, **call) -> np.ndarray:
    """The same request through stock diffusers with the bundle's LoRA and tokens."""
    pipe = cls.from_pretrained(resolve_model(""), safety_checker=None,
                               requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    loaded = read_bundle(bundle.path)
    pipe.load_lora_weights(loaded.lora_path, adapter_name="a")
    embeddings = loaded.embeddings()
    pipe.load_textual_inversion(list(embeddings.values()), token=list(embeddings))
    pipe.set_adapters(["a"], [scale])
    image = pipe(PROMPT, num_inference_steps=10, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(1)], **call).images[0]  # fmt: skip
    return pixels(image)


def test_img2img_equals_stock_diffusers_with_the_adapter(engine, bundles):
    ours = render(engine, spec(init_image=INIT, strength=0.6))
    reference = stock(StableDiffusionImg2ImgPipeline, bundles[0], 0.7, image=INIT, strength=0.6)
    assert np.abs(ours - reference).mean() <= 1e-3
    without = render(engine, spec(adapters=(), init_image=INIT, strength=0.6))
    assert np.abs(ours - without).mean() > 1e-2  # the adapter acts


def test_inpainting_equals_stock_diffusers_and_keeps_the_unmasked_pixels(engine, bundles):
    ours = render(engine, spec(init_image=INIT, mask_image=MASK))
    reference = stock(StableDiffusionInpaintPipeline, bundles[0], 0.7, image=INIT,
                      mask_image=MASK, width=32, height=32)  # fmt: skip
    assert np.abs(ours - reference).mean() <= 1e-3
    keep = np.asarray(MASK) < 128
    change = np.abs(ours - pixels(INIT)).mean(axis=-1)
    assert change[keep].mean() < 0.04  # the VAE's round trip
    assert change[~keep].mean() > 0.15  # repainted


def test_strength_zero_returns_the_init_image_through_the_vae(engine):
    back = render(engine, spec(init_image=INIT, strength=0.0))
    assert np.abs(back - pixels(INIT)).mean() < 0.03
    other = pixels(toyworld.render("red", "circle"))
    assert np.abs(other - pixels(INIT)).mean() > 0.15  # what the bound above rules out


def test_img2img_and_inpainting_requests_batch_with_their_own_adapters(engine):
    requests = [
        spec(init_image=INIT, strength=0.6),
        spec("a <t1> square", (("a1", 1.2),), 2, init_image=toyworld.render("red", "circle"),
             strength=0.6),
        spec("a blue circle", (), 3, init_image=INIT, strength=0.6),
        spec(init_image=INIT, mask_image=MASK),
        spec("a <t1> square", (("a1", -0.5),), 4, init_image=INIT, mask_image=MASK),
    ]  # fmt: skip
    alone = [render(engine, r) for r in requests]
    together = engine.generate_batch([GenerationJob(r) for r in requests])
    for single, outcome in zip(alone, together, strict=True):
        assert np.abs(single - pixels(outcome[0].data)).mean() <= 1e-3


@pytest.mark.slow
def test_the_edge_takes_images_and_refuses_bad_ones(tiny_model: Path, tmp_path: Path):
    with (
        ServerProcess("generator", data_dir=tmp_path, model=str(tiny_model)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = generator_pb2_grpc.GeneratorStub(channel)
        steps = []
        for message in stub.GenerateStream(generator_pb2.GenerateRequest(
            prompt="a red circle", init_image=png(INIT.resize((40, 24))), strength=0.5,
            num_inference_steps=10, seed=3,
        ), timeout=120):  # fmt: skip
            if message.WhichOneof("kind") == "progress":
                steps.append((message.progress.step, message.progress.total_steps))
            else:
                image = message.image
        assert (image.width, image.height) == (40, 24)  # the init image's size
        assert steps[-1] == (5, 5)  # half the schedule at strength 0.5
        for request, field in (
            (generator_pb2.GenerateRequest(prompt="x", mask_image=png(MASK)), "mask_image"),
            (generator_pb2.GenerateRequest(prompt="x", init_image=b"not an image"),
             "init_image"),
            (generator_pb2.GenerateRequest(prompt="x", init_image=png(INIT),
                                           mask_image=png(MASK.resize((16, 16)))), "mask_image"),
            (generator_pb2.GenerateRequest(prompt="x", init_image=png(INIT), strength=1.5),
             "strength"),
            (generator_pb2.GenerateRequest(prompt="x", strength=0.5), "strength"),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in refused.value.details()
