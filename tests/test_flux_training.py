"""FLUX.1 in the trainer: flow matching on packed latents learns (the denoising loss of an
overfit image falls), PTI learns tokens in CLIP-L and T5 then LoRA, DreamBooth-LoRA trains the
transformer, both over gRPC on the tiny FLUX, and their bundles load in stock FluxPipeline (a
killed server's FLUX job resuming is test_trainer_service's, for both SD and FLUX)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc
from PIL import Image

from loraforge_core.bundle import read_bundle
from loraforge_core.families import FLUX
from loraforge_core.families.flux import image_ids, pack, unpack
from loraforge_core.families.objectives import FlowMatching, ObjectiveOptions
from loraforge_core.launch import ServerProcess
from tests.helpers import shape_png
from tests.test_trainer_service import download, job_request, watch_all
from trainer_service.config import TrainingConfig
from trainer_service.training.data import normalized, to_tensor
from trainer_service.training.evaluate import denoising_loss
from trainer_service.training.trainer import train


def test_packing_and_position_ids_are_flux_pipelines() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 12)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 12))
    assert torch.equal(unpack(packed, 4, 8, 12), latents)
    expected = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    assert torch.equal(image_ids(4, 6, "cpu", torch.float32), expected)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_flow_matching_draws_are_replayable_and_stay_in_the_asked_part_of_the_schedule(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # FLUX.1's
    objective = FlowMatching(scheduler, ObjectiveOptions(weighting_scheme=scheme))
    latents = torch.randn(64, 4, 4, 4)
    first = objective.noised(latents, torch.Generator().manual_seed(5))
    again = objective.noised(latents, torch.Generator().manual_seed(5))
    assert torch.equal(first.noisy, again.noisy) and torch.equal(first.timesteps, again.timesteps)
    sigmas = first.timesteps / 1000
    noise = first.target + latents  # the target is the velocity noise - latents
    shaped = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(first.noisy, (1 - shaped) * latents + shaped * noise)
    assert first.weighting is not None and first.weighting.shape == (64,)
    # Textual inversion's draws keep to the least noisy 80% of the schedule's timesteps.
    low = objective.noised(latents, torch.Generator().manual_seed(6), t_fraction=0.8)
    assert low.timesteps.max() <= scheduler.timesteps[200] < first.timesteps.max()


def test_a_flux_run_refuses_min_snr_and_unknown_weighting_schemes() -> None:
    with pytest.raises(ValueError, match="snr_gamma: weights noise prediction"):
        FLUX.objective(None, ObjectiveOptions(snr_gamma=5.0))
    violations = TrainingConfig(weighting_scheme="uniform").validate()
    assert "config.weighting_scheme" in {v.field for v in violations.items}


@pytest.mark.slow
def test_overfitting_one_image_lowers_the_flux_denoising_loss(tiny_flux: Path, tmp_path: Path):
    """Our objective falls, and stock FluxPipeline's sampler with the adapter lands nearer the
    image's latents than without: the velocity we train is the one diffusers integrates (a
    flipped target lowers our own loss as much, and leaves the samples where they were)."""
    from diffusers import FluxPipeline

    image = Image.open(io.BytesIO(shape_png("blue"))).convert("RGB")
    prompt = "a photo of sks object"
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_flux), method="dreambooth_lora",
        instance_prompt=prompt, max_train_steps_tuning=150, save_steps=1000, lora_rank=8,
        learning_rate_unet=5e-3, learning_rate_text=1e-3, random_flip=False, seed=0,
        device="cpu",
    )  # fmt: skip
    bundle = train(config, [image], tmp_path / "run")
    assert bundle.manifest.family == "flux"
    assert "attn.add_q_proj" in bundle.manifest.unet_target_modules  # the text stream too
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    base = denoising_loss(pipe, image, prompt)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pixels = to_tensor(image, 32).unsqueeze(0)
        target = normalized(pipe.vae, pipe.vae.encode(pixels).latent_dist.mean)

    def sample_error() -> float:
        packed = pipe(prompt, height=32, width=32, num_inference_steps=20, guidance_scale=3.5,
                      output_type="latent", generator=torch.Generator().manual_seed(0),
                      max_sequence_length=pipe.tokenizer_2.model_max_length).images  # fmt: skip
        return float((FLUX.spatial_latents(packed, 32, 32, pipe.vae) - target).pow(2).mean())

    base_error = sample_error()
    pipe.load_lora_weights(bundle.path)
    trained = denoising_loss(pipe, image, prompt)
    assert trained < 0.85 * base, (base, trained)
    # Measured: 0.71x with the right target, 0.95x with it flipped.
    assert sample_error() < 0.85 * base_error


@pytest.fixture(scope="module")
def flux_trainer(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(
        "trainer", data_dir=tmp_path_factory.mktemp("flux-trainer"), model=str(tiny_flux)
    ) as server:
        yield server


@pytest.fixture()
def stub(flux_trainer: ServerProcess):
    with grpc.insecure_channel(flux_trainer.target) as channel:
        yield trainer_pb2_grpc.TrainerStub(channel)


def mask_png() -> bytes:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def render(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, num_inference_steps=4, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), guidance_scale=3.5,
                max_sequence_length=pipe.tokenizer_2.model_max_length).images[0]  # fmt: skip


def test_a_flux_job_with_min_snr_is_refused_at_create_naming_the_option(stub) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(job_request("flux-snr", snr_gamma=5.0), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FLUX.1: snr_gamma weights noise prediction on a DDPM" in caught.value.details()
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(caught.value).details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["config.snr_gamma"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pti", "dreambooth_lora"])
def test_flux_jobs_over_grpc_yield_bundles_stock_flux_pipeline_loads(
    stub, tiny_flux: Path, tmp_path: Path, method: str
) -> None:
    from diffusers import FluxPipeline

    request = job_request(f"flux-{method}", validation_prompt="a photo of a <s1>",
                          weighting_scheme="logit_normal", guidance_scale=1.0)  # fmt: skip
    if method == "dreambooth_lora":  # with every checkpoint scored (the images are all red)
        request.method = trainer_pb2.TRAINING_METHOD_DREAMBOOTH_LORA
        del request.placeholder_tokens[:], request.initializer_tokens[:]
        request.config.evaluation_scales[:] = [0.0, 1.0]
        request.config.evaluation_scorer = trainer_pb2.EVALUATION_SCORER_TOY_WORLD
        request.config.evaluation_steps = 4
    else:  # masked training: the loss weighted toward each image's mask
        for image in request.instance_images:
            image.mask = mask_png()
    job = stub.CreateJob(request, timeout=30)
    events = watch_all(stub, job.job_id)
    final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.failure_reason
    assert final.config.weighting_scheme == "logit_normal"
    assert final.config.guidance_scale == pytest.approx(1.0)
    previews = [e.preview for e in events if e.WhichOneof("kind") == "preview"]
    assert previews and previews[0].image.data.startswith(b"\x89PNG")
    checkpoints = [e for e in events if e.WhichOneof("kind") == "checkpoint"]
    evaluated = [e.evaluation for e in events if e.WhichOneof("kind") == "evaluation"]
    assert len(evaluated) == (len(checkpoints) if method == "dreambooth_lora" else 0)
    assert all([s.scale for s in e.evaluation.scores] == [0.0, 1.0] for e in evaluated)
    bundle = read_bundle(download(stub, final.final_artifact_id, tmp_path / "bundle"))
    assert bundle.manifest.family == "flux"

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a <s1>" if method == "pti" else "a photo of sks object"
    if method == "pti":  # a learned token has a vector in CLIP-L and one in T5
        stored = bundle.embeddings()
        assert sorted(stored) == ["clip_l", "t5"]
        for key, encoder, tokenizer in (
            ("clip_l", pipe.text_encoder, pipe.tokenizer),
            ("t5", pipe.text_encoder_2, pipe.tokenizer_2),
        ):
            pipe.load_textual_inversion(stored[key], token=["<s1>"], text_encoder=encoder,
                                        tokenizer=tokenizer)  # fmt: skip
    base = render(pipe, prompt)
    pipe.load_lora_weights(bundle.path, adapter_name="trained")
    assert np.abs(render(pipe, prompt) - base).mean() > 1e-3
