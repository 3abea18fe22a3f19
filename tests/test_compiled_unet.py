"""A compiled denoiser (SD's UNet, FLUX.1's transformer) serves any adapter set, scale and
mix without recompiling, also when the next adapter targets more layers (an extended one) or
carries text-encoder LoRA, and renders what the uncompiled engine renders.

The backend is ``aot_eager``: recompiles are dynamo's decision (its guards), whatever the
backend, and inductor's code generation would take minutes on a 2-core CI machine;
``--compile-denoiser on`` uses inductor.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from PIL import Image
from torch._dynamo.utils import counters

from inference_service.engine import GeneratorEngine, build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.models import load_pipeline
from trainer_service.training.lora import random_lora_bundle

ADAPTERS = 4
# Random requests served after the warm-up (which covers each batch size, the fused and the
# gathered paths) with any recompile an error: 40 per family (SD's were 100 before FLUX.1
# joined; the suite's time).
CHECKED_REQUESTS = 40


def make_engine(model: Path, root: Path, compile_backend: str | None) -> GeneratorEngine:
    pipe = load_pipeline(str(model))
    engine = build_engine(
        pipe, root, max_resident=ADAPTERS, slot_rank=8, extended_slots=True,
        compile_backend=compile_backend,
    )  # fmt: skip
    for i in range(ADAPTERS):
        rank = 4 + 2 * (i % 2)  # two ranks: the gathered factors' width varies with the mix
        # and one extended adapter (SD: LoCon; FLUX.1: the output projections and
        # modulations): the others hold zeros in its layers' slots
        bundle = random_lora_bundle(str(model), root / "bundles", seed=i, rank=rank,
                                    extended=i == ADAPTERS - 1)  # fmt: skip
        engine.adapters.register(f"a{i}", data=pack(bundle.path))
        assert engine.adapters.entries[f"a{i}"].peft_name.startswith("slot-")
    return engine


def spec(adapters: list[tuple[str, float]], seed: int = 0) -> GenerationSpec:
    return GenerationSpec(
        "a red circle", width=32, height=32, steps=2, guidance_scale=5.0, seed=seed,
        adapters=[AdapterRequest(a, s) for a, s in adapters],
    )  # fmt: skip


def random_batch(rng: random.Random) -> list[GenerationSpec]:
    """1 to 3 requests, each with 0 to 3 adapters at random scales."""
    return [
        spec([(f"a{i}", round(rng.uniform(-1, 1.5), 3))
              for i in rng.sample(range(ADAPTERS), rng.randint(0, 3))], seed=rng.randint(0, 9))
        for _ in range(rng.randint(1, 3))
    ]  # fmt: skip


def serve(engine: GeneratorEngine, batch: list[GenerationSpec]) -> list[np.ndarray]:
    outcomes = engine.generate_batch([GenerationJob(s) for s in batch])
    for outcome in outcomes:  # a recompile under error_on_recompile comes back as an outcome
        assert not isinstance(outcome, Exception), outcome
    return [
        np.asarray(Image.open(io.BytesIO(image.data)), dtype=np.float32) / 255
        for outcome in outcomes
        for image in outcome
    ]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()  # reset() keeps them: a test counts its own graphs
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_model", "tiny_flux"])
def test_changing_adapters_scales_and_mixes_never_recompiles(
    model: str, tmp_path: Path, fresh_dynamo, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(model)
    compiled = make_engine(path, tmp_path / "compiled", "aot_eager")
    plain = make_engine(path, tmp_path / "plain", None)
    rng = random.Random(0)
    # Warm-up: the base, a fused set, and mixed batches of each batch size (after a second
    # size, dynamo makes the sizes dynamic).
    for batch in ([spec([])], [spec([("a0", 1.0)])],
                  *[random_batch(rng) for _ in range(12)]):  # fmt: skip
        serve(compiled, batch)
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs < torch._dynamo.config.recompile_limit  # never fell back to eager

    torch._dynamo.config.error_on_recompile = True  # any recompile from here on raises
    requests = 0
    while requests < CHECKED_REQUESTS:
        batch = random_batch(rng)
        requests += len(batch)
        serve(compiled, batch)
    assert counters["stats"]["unique_graphs"] == graphs

    # The compiled UNet follows every change: it renders what the uncompiled one renders.
    for batch in (random_batch(rng), [spec([("a1", 0.7)])], [spec([("a2", -0.4), ("a3", 1.2)])]):
        for ours, reference in zip(serve(compiled, batch), serve(plain, batch), strict=True):
            assert np.abs(ours - reference).mean() <= 1e-3
