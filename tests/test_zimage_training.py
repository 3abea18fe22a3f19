"""Z-Image in the trainer: flow matching through the transformer's own time and sign learns
(the denoising loss of an overfit image falls, and stock ZImagePipeline's sampler lands nearer
it), DreamBooth-LoRA trains over gRPC into a bundle stock ZImagePipeline loads, and PTI is
refused at CreateJob, saying why (the family module's docstring: no learned tokens in an LLM
encoder)."""

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
from loraforge_core.launch import ServerProcess
from tests.helpers import shape_png
from tests.test_trainer_service import download, job_request, watch_all
from trainer_service.config import TrainingConfig
from trainer_service.training.data import normalized, to_tensor
from trainer_service.training.evaluate import denoising_loss
from trainer_service.training.trainer import train

PROMPT = "a photo of sks object"


def render(pipe, prompt: str, **options) -> np.ndarray:
    options = {"max_sequence_length": pipe.tokenizer.model_max_length, **options}
    return pipe(prompt, num_inference_steps=4, height=32, width=32, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), **options).images[0]  # fmt: skip


@pytest.mark.slow
def test_overfitting_one_image_lowers_the_zimage_denoising_loss(tiny_zimage: Path, tmp_path):
    """Our loss falls, and so does the distance of stock ZImagePipeline's samples to the
    image: the prediction we train (time 1 - sigma, the velocity negated) is the one the
    pipeline integrates; a wrong sign or time lowers our loss and not the sampler's."""
    from diffusers import ZImagePipeline

    image = Image.open(io.BytesIO(shape_png("blue"))).convert("RGB")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_zimage), method="dreambooth_lora",
        instance_prompt=PROMPT, max_train_steps_tuning=150, save_steps=1000, lora_rank=8,
        learning_rate_unet=5e-3, random_flip=False, seed=0, device="cpu",
    )  # fmt: skip
    bundle = train(config, [image], tmp_path / "run")
    assert bundle.manifest.family == "zimage"
    assert not any(k.startswith("text_encoder") for k in bundle.lora_state_dict())
    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    base = denoising_loss(pipe, image, PROMPT)
    with torch.no_grad():
        target = normalized(pipe.vae, pipe.vae.encode(to_tensor(image, 32)[None]).latent_dist.mean)

    def sample_error() -> float:
        latents = render(pipe, PROMPT, output_type="latent")
        return float((latents - target).pow(2).mean())

    base_error = sample_error()
    pipe.load_lora_weights(bundle.path)
    trained = denoising_loss(pipe, image, PROMPT)
    assert trained < 0.85 * base, (base, trained)
    after = sample_error()
    assert after < 0.85 * base_error


@pytest.fixture(scope="module")
def stub(tiny_zimage: Path, tmp_path_factory: pytest.TempPathFactory):
    with (
        ServerProcess("trainer", data_dir=tmp_path_factory.mktemp("zimage-trainer"),
                      model=str(tiny_zimage)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):  # fmt: skip
        yield trainer_pb2_grpc.TrainerStub(channel)


def test_a_zimage_pti_job_is_refused_at_create_saying_which_methods_it_trains(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(job_request("zimage-pti"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Z-Image models train with dreambooth_lora only" in caught.value.details()
    assert "config.method" in caught.value.details()


@pytest.mark.slow
def test_a_zimage_dreambooth_job_over_grpc_yields_a_bundle_stock_zimage_loads(
    stub, tiny_zimage: Path, tmp_path: Path
) -> None:
    from diffusers import ZImagePipeline

    request = job_request("zimage-db", weighting_scheme="logit_normal",
                          validation_prompt=PROMPT)  # fmt: skip
    request.method = trainer_pb2.TRAINING_METHOD_DREAMBOOTH_LORA
    del request.placeholder_tokens[:], request.initializer_tokens[:]
    job = stub.CreateJob(request, timeout=30)
    events = watch_all(stub, job.job_id)
    final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.failure_reason
    previews = [e.preview for e in events if e.WhichOneof("kind") == "preview"]
    assert previews and previews[0].image.data.startswith(b"\x89PNG")
    bundle = read_bundle(download(stub, final.final_artifact_id, tmp_path / "bundle"))
    assert bundle.manifest.family == "zimage" and bundle.manifest.tokens == []

    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    base = np.asarray(render(pipe, PROMPT), dtype=np.float32)
    pipe.load_lora_weights(bundle.path, adapter_name="trained")
    assert np.abs(np.asarray(render(pipe, PROMPT), dtype=np.float32) - base).mean() > 1e-1
