"""Mixed-adapter batching: requests naming different adapters at different scales share one
denoising batch, and each gets the image it would get alone."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from inference_service.batching import PipelineTurns
from inference_service.engine import GeneratorEngine, build_engine
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core.bundle import pack
from loraforge_core.errors import Cancelled
from trainer_service.training.lora import random_lora_bundle

ADAPTERS = 4


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> GeneratorEngine:
    root = tmp_path_factory.mktemp("batching")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    engine = build_engine(pipe, root / "generator", max_resident=ADAPTERS + 1, slot_rank=8)
    for i in range(ADAPTERS):
        bundle = random_lora_bundle(str(tiny_model), root / "bundles", seed=i, token=f"<t{i}>")
        engine.adapters.register(f"a{i}", data=pack(bundle.path))
    # One adapter of a larger rank than the slots: the general path, mixed in too.
    large = random_lora_bundle(str(tiny_model), root / "bundles", seed=9, rank=16)
    assert engine.adapters.register("large", data=pack(large.path)).peft_name == "adapter-large"
    return engine


def specs() -> list[GenerationSpec]:
    """Different adapters, scales, text-encoder scales, image counts and prompts."""

    def spec(prompt, adapters, seed, num_images=1):
        return GenerationSpec(
            prompt=prompt, width=32, height=32, steps=5, guidance_scale=5.0, seed=seed,
            num_images=num_images,
            adapters=[AdapterRequest(a, s, t) for a, s, t in adapters],
        )  # fmt: skip

    return [
        spec("a <t0> circle", [("a0", 1.0, None)], 1),
        spec("a red <t1>", [("a1", 0.5, 1.5)], 2, num_images=2),
        spec("a green square", [], 3),
        spec("a <t2> and a <t3>", [("a2", 1.2, 0.0), ("a3", -0.7, None)], 4),
        spec("a blue circle", [("large", 0.8, None), ("a0", 0.3, None)], 5),
        spec("a <t3> square", [("a3", 1.0, None)], 6),
    ]


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(i.data)), dtype=np.float32) / 255 for i in images]


def test_a_mixed_batch_gives_each_request_its_unbatched_images(engine):
    alone = [pixels(engine.generate(spec)) for spec in specs()]
    batched = engine.generate_batch([GenerationJob(spec) for spec in specs()])
    for spec, single, outcome in zip(specs(), alone, batched, strict=True):
        assert not isinstance(outcome, Exception), outcome
        together = pixels(outcome)
        assert len(together) == spec.num_images
        for a, b in zip(single, together, strict=True):
            assert np.abs(a - b).mean() <= 1e-3, spec.prompt
    # The adapters really act: the requests with adapters differ from the base render.
    base = pixels(engine.generate(GenerationSpec("a <t0> circle", width=32, height=32, steps=5,
                                                 guidance_scale=5.0, seed=1)))  # fmt: skip
    assert np.abs(base[0] - alone[0][0]).mean() > 1e-2


def test_fusion_off_renders_what_fusion_on_renders(engine):
    """--adapter-fusion off: one-set batches take the stacked factors instead of merged
    weights; the images are the same."""
    fused = [pixels(engine.generate(spec)) for spec in specs()]
    engine.mixer.fuse = False
    try:
        unfused = [pixels(engine.generate(spec)) for spec in specs()]
        engine.mixer.set("unet", {"slot-0": 1.0})
        kinds = {layer.mix_plan.kind for layer in engine.mixer.layers["unet"]}
    finally:
        engine.mixer.clear()
        engine.mixer.fuse = True
    assert kinds == {"stacked"}
    for a, b in zip(fused, unfused, strict=True):
        assert np.abs(a[0] - b[0]).mean() <= 1e-3


def test_requests_with_other_settings_are_served_in_their_own_batch(engine):
    other = specs()[0]
    other.steps = 3
    outcomes = engine.generate_batch([GenerationJob(specs()[0]), GenerationJob(other)])
    for spec, outcome in zip([specs()[0], other], outcomes, strict=True):
        assert np.abs(pixels(outcome)[0] - pixels(engine.generate(spec))[0]).mean() <= 1e-3


def test_a_request_that_cannot_be_served_does_not_fail_its_batch(engine):
    good, bad = specs()[0], specs()[0]
    bad.adapters = [AdapterRequest("missing")]
    outcomes = engine.generate_batch([GenerationJob(bad), GenerationJob(good)])
    assert "missing" in str(outcomes[0])
    assert np.abs(pixels(outcomes[1])[0] - pixels(engine.generate(good))[0]).mean() <= 1e-3


@pytest.mark.parametrize("max_batch_images", [8, 1])
def test_waiting_requests_share_batches_unless_batching_is_off(engine, max_batch_images):
    turns = PipelineTurns(max_images=max_batch_images, max_adapters=ADAPTERS + 1)
    sizes: list[int] = []

    def recording(jobs):  # the real engine serves; only the batch sizes are noted
        sizes.append(len(jobs))
        return engine.serve_batch(jobs)

    try:
        outcomes = asyncio.run(_submit_while_busy(turns, recording, engine, specs()))
    finally:
        turns.close()
    for spec, outcome in zip(specs(), outcomes, strict=True):
        assert len(outcome) == spec.num_images
    # Three requests, an adapter operation, three more: the operation splits the batches.
    assert sizes == ([3, 3] if max_batch_images == 8 else [1] * 6)


async def _submit_while_busy(turns: PipelineTurns, serve, engine, all_specs: list[GenerationSpec]):
    gate = threading.Event()
    turns.executor.submit(gate.wait)  # the pipeline thread is busy; everything queues
    tasks = [asyncio.create_task(turns.generate(GenerationJob(s), serve)) for s in all_specs[:3]]
    tasks.append(asyncio.create_task(turns.run(engine.adapters.list)))
    tasks += [asyncio.create_task(turns.generate(GenerationJob(s), serve)) for s in all_specs[3:]]
    while len(turns.queue.pending) < len(all_specs) or not turns.queue.barriers:
        await asyncio.sleep(0)  # let every task take its ticket (no time passes)
    gate.set()
    results = await asyncio.gather(*tasks)
    return results[:3] + results[4:]


def test_the_pipelines_find_their_device_without_walking_their_modules(engine, monkeypatch):
    """diffusers looks for offloading hooks in every module of every component to find the
    execution device, at each call; with the adapter slots' modules that was 7% of a small
    render. The engine's pipelines (each mode's) answer from the device they were loaded on."""
    pipes = [engine._pipeline(mode) for mode in ("txt2img", "img2img", "inpaint")]

    def walked(self):
        raise AssertionError("a module tree was walked")

    monkeypatch.setattr(torch.nn.Module, "modules", walked)
    monkeypatch.setattr(torch.nn.Module, "named_modules", walked)
    assert {pipe._execution_device for pipe in pipes} == {torch.device("cpu")}
    assert [type(pipe).__name__ for pipe in pipes] == [
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ]  # fmt: skip


def test_the_denoiser_runs_without_lora_wrappers_unless_a_request_mixes(engine):
    """With no adapter, or one set shared by the batch (fused), the UNet makes the module
    calls stock diffusers makes: no LoRA wrapper runs. A mixed batch runs them; afterwards,
    and after a cancelled request, every LoRA layer is back in its place."""
    layers = engine.mixer.layers["unet"]
    calls: list[str] = []
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.append("unet"))
             for layer in layers]  # fmt: skip

    def in_place() -> bool:
        named = dict(engine.pipe.unet.named_modules())
        return all(any(m is layer for m in named.values()) for layer in layers)

    def spec(*adapters: tuple[str, float], seed: int = 0) -> GenerationSpec:
        return GenerationSpec("a red circle", width=32, height=32, steps=2, seed=seed,
                              adapters=[AdapterRequest(a, s) for a, s in adapters])  # fmt: skip

    try:
        engine.generate(spec())
        engine.generate(spec(("a0", 0.8)))
        assert calls == [] and in_place()
        engine.generate_batch([GenerationJob(spec(("a0", 0.8))), GenerationJob(spec(seed=1))])
        assert calls and in_place()
        with pytest.raises(Cancelled):
            engine.generate(spec(("a1", 0.5)), is_cancelled=lambda: True)
        assert in_place()
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "pndm", "euler_ancestral"])
def test_a_scheduler_reused_across_requests_renders_what_a_fresh_one_does(engine, scheduler):
    """The engine keeps one scheduler per name; a multistep one holds state between steps,
    which must not carry over from one request (or one pipeline mode) to the next."""

    def render(seed: int, steps: int, name: str = scheduler) -> bytes:
        spec = GenerationSpec("a red circle", width=32, height=32, steps=steps, seed=seed,
                              guidance_scale=5.0, scheduler=name)  # fmt: skip
        return engine.generate(spec)[0].data

    engine._schedulers.pop(scheduler, None)  # the first render makes it afresh
    fresh = render(3, 4)
    render(7, 6)  # the same scheduler left mid-state by another length and seed
    render(5, 3, name="ddim")
    assert render(3, 4) == fresh


def test_the_adapter_list_answers_while_a_generation_runs(engine):
    """ListAdapters reads the registry; it must not wait for the pipeline's generation."""
    first_step, listed, seen_during_generation = threading.Event(), threading.Event(), []

    def on_step(step: int, total: int) -> None:
        seen_during_generation.append(listed.is_set())
        first_step.set()

    spec = GenerationSpec("a red circle", width=32, height=32, steps=60, guidance_scale=5.0)
    worker = threading.Thread(target=engine.generate, args=(spec, on_step))
    worker.start()
    assert first_step.wait(120)
    engine.adapters.list()
    listed.set()
    worker.join()
    # Steps ran after the list was answered: it did not wait for the generation to end.
    assert seen_during_generation[-1], "the list was answered only after the generation"
