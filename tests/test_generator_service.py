"""The Generator service on loopback with the tiny model: scales, composition, cache, limits."""

from __future__ import annotations

import io
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from loraforge.v1 import generator_pb2, generator_pb2_grpc
from PIL import Image

from loraforge_core.bundle import pack
from loraforge_core.launch import ServerProcess
from tests.helpers import random_bundle

STEPS = 6


@pytest.fixture(scope="module")
def bundles(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("store")
    made = {
        f"a{i}": random_bundle(str(tiny_model), root, seed=i, token=f"<t{i}>") for i in range(4)
    }
    made["same-token"] = random_bundle(str(tiny_model), root, seed=9, token="<t0>")
    return made


@pytest.fixture(scope="module")
def generator(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with ServerProcess(
        "generator",
        data_dir=tmp_path_factory.mktemp("generator"),
        model=str(tiny_model),
        extra_args=["--max-resident-adapters", "2"],
    ) as server:
        yield server


@pytest.fixture(scope="module")
def stub(generator: ServerProcess, bundles: dict) -> Iterator[generator_pb2_grpc.GeneratorStub]:
    with grpc.insecure_channel(generator.target) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        for adapter_id, bundle in bundles.items():
            stub.LoadAdapter(
                generator_pb2.LoadAdapterRequest(adapter_id=adapter_id, data=pack(bundle.path)),
                timeout=60,
            )
        yield stub


def request(prompt: str = "a photo of a <t0>", adapters=(), seed: int = 7, **kw):
    refs = []
    for a in adapters:
        adapter_id, *scales = a
        ref = generator_pb2.AdapterRef(adapter_id=adapter_id)
        if scales:
            ref.scale = scales[0]
        if len(scales) > 1:
            ref.text_encoder_scale = scales[1]
        refs.append(ref)
    fields = {
        "prompt": prompt,
        "num_inference_steps": STEPS,
        "seed": seed,
        "width": 32,
        "height": 32,
        **kw,
    }
    return generator_pb2.GenerateRequest(adapters=refs, **fields)


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"), dtype=np.float32) / 255


def generate(stub, req) -> np.ndarray:
    reply = stub.Generate(req, timeout=120)
    assert reply.images[0].seed == req.seed
    return pixels(reply.images[0])


def stock_pipeline(tiny_model: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_render(pipe, prompt: str, seed: int = 7) -> np.ndarray:
    image = pipe(
        prompt,
        num_inference_steps=STEPS,
        width=32,
        height=32,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(seed)],
    ).images[0]
    return np.asarray(image, dtype=np.float32) / 255


def test_scale_zero_is_the_base_and_scales_match_stock_diffusers(stub, bundles, tiny_model):
    pipe = stock_pipeline(tiny_model)
    base = stock_render(pipe, "a photo of a dog")
    at_zero = generate(stub, request("a photo of a dog", adapters=[("a0", 0.0, 0.0)]))
    assert np.array_equal(at_zero, base)
    assert (
        np.abs(generate(stub, request("a photo of a dog", adapters=[("a0", 1.0)])) - base).mean()
        > 1e-3
    )
    bundle = bundles["a0"]
    pipe.load_lora_weights(bundle.path, adapter_name="a0")
    pipe.load_textual_inversion(list(bundle.embeddings().values()), token=["<t0>"])
    # The learned token applies at every scale (as with cloneofsimo's patch_pipe); the scales
    # weigh the LoRA deltas only.
    for scale, te_scale in ((0.0, 0.0), (0.5, 0.25), (1.0, 1.0), (1.5, 0.5)):
        pipe.set_adapters(["a0"], [{"unet": scale, "text_encoder": te_scale}])
        expected = stock_render(pipe, "a photo of a <t0>")
        served = generate(stub, request(adapters=[("a0", scale, te_scale)]))
        assert np.abs(served - expected).mean() <= 1e-3, (scale, te_scale)


def test_two_adapters_compose_as_diffusers_composes_them(stub, bundles, tiny_model):
    pipe = stock_pipeline(tiny_model)
    for name in ("a1", "a2"):
        pipe.load_lora_weights(bundles[name].path, adapter_name=name)
        pipe.load_textual_inversion(
            list(bundles[name].embeddings().values()), token=list(bundles[name].embeddings())
        )
    pipe.set_adapters(
        ["a1", "a2"], [{"unet": 0.8, "text_encoder": 0.8}, {"unet": 0.6, "text_encoder": 0.3}]
    )
    expected = stock_render(pipe, "<t1> and <t2>")
    served = generate(stub, request("<t1> and <t2>", adapters=[("a1", 0.8), ("a2", 0.6, 0.3)]))
    assert np.abs(served - expected).mean() <= 1e-3


def test_concurrent_requests_do_not_cross_talk(stub):
    cases = [
        request(f"<t{i % 4}> thing", adapters=[(f"a{i % 4}", 0.5 + 0.25 * (i % 3))], seed=i)
        for i in range(8)
    ]
    alone = [generate(stub, c) for c in cases]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: generate(stub, c), cases))
    # Batched and alone run the same math in another order (float sums differ in the last
    # bits), so a pixel may round to the neighbouring 8-bit level; cross-talk (another
    # request's adapter, scale or seed) moves the image by far more.
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a - b).max() <= 1 / 255 + 1e-6
        assert np.abs(a - b).mean() <= 1e-3


def test_eviction_under_a_budget_keeps_results_correct(stub):
    first = generate(stub, request(adapters=[("a3", 1.0)]))
    for name in ("a0", "a1", "a2"):
        generate(stub, request(adapters=[(name, 1.0)]))
    resident = [
        a for a in stub.ListAdapters(generator_pb2.ListAdaptersRequest()).adapters if a.resident
    ]
    assert len(resident) <= 2
    assert np.array_equal(generate(stub, request(adapters=[("a3", 1.0)])), first)


def test_same_token_in_two_adapters_is_refused(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request(adapters=[("a0", 1.0), ("same-token", 1.0)]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "<t0>" in caught.value.details()


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (request(adapters=[("missing", 1.0)]), grpc.StatusCode.NOT_FOUND),
        (request(adapters=[("a0", 9.0)]), grpc.StatusCode.INVALID_ARGUMENT),
        (request(adapters=[("a0", float("nan"))]), grpc.StatusCode.INVALID_ARGUMENT),
        (request(width=33), grpc.StatusCode.INVALID_ARGUMENT),
        (request(num_images=100), grpc.StatusCode.INVALID_ARGUMENT),
        (request(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_get_clear_errors(stub, req, code):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(req, timeout=60)
    assert caught.value.code() == code


def test_a_t5_length_on_an_sd_model_is_refused_naming_the_field(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request(max_sequence_length=64), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_sequence_length" in caught.value.details()
    assert "fixed length" in caught.value.details()


@pytest.mark.parametrize("uri", ["x" * 300, "a/" * 600, "../outside"])
def test_load_from_an_unusable_store_path_is_invalid_argument(stub, uri):
    """Found by the fuzz test: a 300-byte name made stat() fail and the call INTERNAL."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(generator_pb2.LoadAdapterRequest(adapter_id="p", uri=uri), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "path" in caught.value.details()


@pytest.mark.parametrize("scheduler", list(generator_pb2.Scheduler.values()))
def test_every_scheduler_renders_from_a_single_step(stub, scheduler):
    reply = stub.Generate(request(num_inference_steps=1, scheduler=scheduler), timeout=60)
    assert np.isfinite(pixels(reply.images[0])).all()


def test_stream_reports_each_step_then_images_with_seeds(stub):
    replies = list(stub.GenerateStream(request(num_images=2, seed=40), timeout=120))
    steps = [r.progress.step for r in replies if r.WhichOneof("kind") == "progress"]
    images = [r.image for r in replies if r.WhichOneof("kind") == "image"]
    assert steps == list(range(1, STEPS + 1))
    assert [i.seed for i in images] == [40, 41]


def test_same_request_same_bytes_and_pickle_is_refused(stub):
    assert stub.Generate(request(), timeout=60) == stub.Generate(request(), timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(
            generator_pb2.LoadAdapterRequest(adapter_id="evil", data=b"\x80\x04pickle...")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_kohya_and_diffusers_files_load_and_apply(fmt, stub, bundles, tiny_model, tmp_path):
    from safetensors.torch import save

    from loraforge_core import interop

    bundle = bundles["a1"]
    if fmt == "kohya":  # the one-file A1111 form: the generator imports its tokens too
        state, metadata = interop.export_kohya(bundle, bundle_embeddings=True)
        data = save(state, metadata=metadata)
    else:
        data = bundle.lora_path.read_bytes()
    info = stub.LoadAdapter(
        generator_pb2.LoadAdapterRequest(adapter_id=f"file-{fmt}", data=data), timeout=60
    )
    assert info.source_format == fmt and info.rank == 4
    assert list(info.tokens) == (["<t1>"] if fmt == "kohya" else [])
    pipe = stock_pipeline(tiny_model)
    pipe.load_lora_weights(bundle.lora_path)
    expected = stock_render(pipe, "a red circle")
    served = generate(stub, request("a red circle", adapters=[(f"file-{fmt}", 1.0)]))
    assert np.abs(served - expected).mean() <= 1e-3


def test_adapter_for_another_architecture_is_failed_precondition(stub, tmp_path):
    import copy

    from safetensors.torch import save

    from loraforge_core import interop
    from loraforge_core.architectures import TINY
    from loraforge_core.models import build_pipeline

    other = copy.deepcopy(TINY)
    other["text_encoder"]["hidden_size"] = 32
    other["unet"]["cross_attention_dim"] = 32
    build_pipeline(other).save_pretrained(tmp_path / "other")
    foreign = random_bundle(str(tmp_path / "other"), tmp_path / "store", seed=1)
    for data in (pack(foreign.path), save(*interop.export_kohya(foreign))):
        with pytest.raises(grpc.RpcError) as caught:
            stub.LoadAdapter(
                generator_pb2.LoadAdapterRequest(adapter_id="foreign", data=data), timeout=60
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another architecture" in caught.value.details() or "hidden size" in (
            caught.value.details()
        )
    # The server still serves.
    generate(stub, request("a red circle"))


def test_a_learned_token_means_nothing_without_its_adapter(stub, bundles, tiny_model):
    """<t0> belongs to a0: in a request with only a1 it is plain text, as in a stock pipeline
    that never loaded it."""
    pipe = stock_pipeline(tiny_model)
    pipe.load_lora_weights(bundles["a1"].path, adapter_name="a1")
    expected = stock_render(pipe, "a photo of a <t0>")
    served = generate(stub, request("a photo of a <t0>", adapters=[("a1", 1.0)]))
    assert np.abs(served - expected).mean() <= 1e-3
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request("a <|lf0|> circle"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("part", ["lora", "embeddings"])
def test_an_adapter_with_non_finite_weights_is_refused_naming_the_tensor(
    stub, bundles, tmp_path, part
) -> None:
    from loraforge_core.bundle import read_bundle, write_bundle

    source = read_bundle(bundles["a0"].path)
    lora, embeddings = source.lora_state_dict(), source.embeddings()
    tensors = lora if part == "lora" else embeddings
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    broken = write_bundle(tmp_path / "broken", lora, embeddings, source.manifest)
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(
            generator_pb2.LoadAdapterRequest(adapter_id="broken", data=pack(broken.path)),
            timeout=60,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name in caught.value.details() and "NaN" in caught.value.details()
    listed = stub.ListAdapters(generator_pb2.ListAdaptersRequest(), timeout=10).adapters
    assert "broken" not in [a.adapter_id for a in listed]


@pytest.mark.slow
def test_the_client_sends_each_adapter_to_one_replica_of_several(tiny_model: Path, tmp_path):
    """Three generators that can each load any of six bundles by id: with affinity every
    adapter is loaded on one replica only, whatever the number of requests; a replica that
    goes away hands its adapters to the others."""
    from contextlib import ExitStack

    from loraforge_client import GeneratorClient

    ids = [random_bundle(str(tiny_model), tmp_path / "store", seed=40 + i).id for i in range(6)]
    with ExitStack() as stack:
        servers = []
        for n in range(3):
            data = tmp_path / f"g{n}"
            shutil.copytree(tmp_path / "store", data / "artifacts")
            servers.append(stack.enter_context(
                ServerProcess("generator", data_dir=data, model=str(tiny_model))))  # fmt: skip
        client = stack.enter_context(GeneratorClient([s.target for s in servers], timeout=120))
        requests = ids * 5
        random.Random(0).shuffle(requests)  # round robin would spread each over replicas
        for i, adapter in enumerate(requests):
            client.generate("a circle", adapters=[(adapter, 1.0)], width=32, height=32,
                            steps=2, seed=i)  # fmt: skip
        holders = Counter(a.adapter_id for a in client.list_adapters() if a.resident)
        assert holders == dict.fromkeys(ids, 1)  # each adapter on exactly one replica
        busiest = max(servers, key=lambda s: len(_resident(s)))
        moved = _resident(busiest)
        busiest.terminate()
        for adapter in moved:  # served elsewhere now
            assert client.generate("x", adapters=[(adapter, 1.0)], width=32, height=32, steps=2)


def _resident(server: ServerProcess) -> list[str]:
    with grpc.insecure_channel(server.target) as channel:
        reply = generator_pb2_grpc.GeneratorStub(channel).ListAdapters(
            generator_pb2.ListAdaptersRequest(), timeout=10
        )
    return [a.adapter_id for a in reply.adapters if a.resident]
