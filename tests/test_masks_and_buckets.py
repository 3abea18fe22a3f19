"""Masked training (lora_pti's loss masks, face masks) and aspect-ratio bucketing: the masks and
bucket shapes reach the loss and the UNet, and requests that cannot work are refused clearly."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc
from loraforge_client import images_from_folder
from loraforge_client._common import create_job_request
from PIL import Image

from loraforge_core.errors import FailedPrecondition
from loraforge_core.families.objectives import prediction_loss
from loraforge_core.launch import ServerProcess
from loraforge_core.models import resolve_model
from loraforge_core.toyworld.fidelity import staged_concept_examples
from tests.helpers import shape_png
from trainer_service.config import TrainingConfig
from trainer_service.jobdir import ImageUpload, JobDir
from trainer_service.jobs import JobSpec, validate
from trainer_service.training.data import InstanceExample, TrainingData, bucket_for, buckets
from trainer_service.training.faces import face_mask
from trainer_service.training.masks import loss_weights
from trainer_service.training.trainer import RunPaths, Trainer

QUICK = dict(max_train_steps_ti=2, max_train_steps_tuning=2, save_steps=100, seed=0,
             gradient_accumulation_steps=1)  # fmt: skip


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def half_mask(size: tuple[int, int] = (32, 32)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # the left half is the subject
    return mask


# ---------------------------------------------------------------------------- the loss
def test_loss_weights_are_lora_pti_s():
    masks = torch.tensor([[1.0, 0.0], [0.5, 1.0]]).reshape(1, 1, 2, 2)
    for temperature in (1.0, 3.0):
        weights = loss_weights(masks, (2, 2), temperature)
        seed = (masks * 2 - 1) * 0.5 + 1.0  # lora_pti: normalised to [-1, 1], * 0.5 + 1
        seed = (seed + 0.01).pow(temperature)
        assert torch.allclose(weights, seed / seed.max())
    assert torch.equal(loss_weights(torch.ones(1, 1, 4, 4), (2, 2), 1.0), torch.ones(1, 1, 2, 2))


def test_weighted_loss_multiplies_prediction_and_target_as_lora_pti_does():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()  # epsilon prediction
    prediction, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    weights = torch.rand(2, 1, 3, 3)
    loss = prediction_loss(prediction, scheduler, noise, noise, torch.zeros(2), weights=weights)
    expected = ((prediction * weights - noise * weights) ** 2).mean([1, 2, 3]).mean()
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, prediction_loss(prediction, scheduler, noise, noise,
                                                    torch.zeros(2)))  # fmt: skip


def test_a_mask_follows_its_image_and_its_mirror_into_the_batch():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(resolve_model(""), subfolder="vae")
    config = TrainingConfig(train_batch_size=1)
    image = Image.open(io.BytesIO(shape_png("red")))
    data = TrainingData(config, [InstanceExample(image, mask=half_mask())], vae, 32, "cpu")
    seen = set()
    for step in range(12):
        generator = torch.Generator().manual_seed(step)
        index = data.draw_indices(torch.Generator().manual_seed(step))[0]
        weights = data.batch(generator).weights[0, 0]
        half = weights.shape[-1] // 2
        left, right = weights[:, :half].mean().item(), weights[:, half:].mean().item()
        assert (left > right) == (index == 0)  # the mirror's subject is on the right
        seen.add(index)
    assert seen == {0, 1}


# ---------------------------------------------------------------------------- faces
def test_the_face_detector_finds_the_astronaut_s_face_offline():
    from skimage import data as photos

    astronaut = Image.fromarray(photos.astronaut())
    mask = np.asarray(face_mask(astronaut)) > 0
    ys, xs = np.nonzero(mask)
    assert 0.01 < mask.mean() < 0.1  # a face, not the picture
    assert xs.min() <= 210 <= xs.max() and ys.min() <= 110 <= ys.max()  # her face
    assert face_mask(Image.open(io.BytesIO(shape_png("red", size=128)))) is None


def test_without_a_detector_face_masks_are_a_failed_precondition(monkeypatch):
    spec = JobSpec("", TrainingConfig(use_face_segmentation_condition=True),
                   [ImageUpload(shape_png("red"), "a.png")])  # fmt: skip
    monkeypatch.setitem(sys.modules, "cv2", None)  # what a trainer without OpenCV has
    with pytest.raises(FailedPrecondition, match=r"InstanceImage\.mask"):
        validate(spec)
    spec.images[0].mask = png(half_mask())  # every image brings its mask: nothing to detect
    validate(spec)


# ---------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def trainer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("masks")
    with ServerProcess("trainer", data_dir=root, model=str(tiny_model)) as server:
        yield server


def test_masks_travel_from_a_folder_to_training(trainer, tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "red.png").write_bytes(shape_png("red"))
    (folder / "red.mask.png").write_bytes(png(half_mask()))
    (folder / "red.txt").write_text("a <s1> circle")
    (folder / "blue.png").write_bytes(shape_png("blue"))
    from skimage import data as photos

    (folder / "face.png").write_bytes(png(Image.fromarray(photos.astronaut()).resize((128, 128))))
    images = images_from_folder(folder)
    assert [(i.filename, bool(i.mask)) for i in images] == [
        ("blue.png", False), ("face.png", False), ("red.png", True)]  # fmt: skip
    request = create_job_request(images, template="none", use_face_segmentation_condition=True,
                                 mask_temperature=2.0, **QUICK)  # fmt: skip
    with grpc.insecure_channel(trainer.target) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        job = stub.CreateJob(request, timeout=30)
        events = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
        final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=30)
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.failure_reason
    assert final.config.mask_temperature == 2.0
    logs = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert "face masks for 1 of 3 images" in logs  # the astronaut; blue has no face
    assert any("no face found in image 0 (blue.png)" in m for m in logs)
    stored = JobDir(trainer.data_dir / "jobs" / job.job_id).examples()
    assert [e.mask is not None for e in stored] == [False, False, True]
    assert np.array_equal(np.asarray(stored[2].mask), np.asarray(half_mask()))


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda r: setattr(r.instance_images[0], "mask", png(half_mask((16, 16)))),
         "instance_images[0].mask", "give a mask the image's size, 32x32"),
        (lambda r: setattr(r.instance_images[0], "mask", b"not a png"),
         "instance_images[0].mask", "cannot decode"),
        (lambda r: setattr(r.config, "use_mask_captioned_data", True),
         "instance_images[0].mask", "needs each image's mask"),
        (lambda r: (setattr(r.config, "use_mask_captioned_data", True),
                    setattr(r, "template", trainer_pb2.CAPTION_TEMPLATE_OBJECT)),
         "template", "use template NONE"),
        (lambda r: setattr(r.config, "mask_temperature", -1.0), "config.mask_temperature",
         "must be in [0, 16]"),
    ],
)  # fmt: skip
def test_bad_masks_are_refused_with_the_field_to_fix(trainer, change, field, message):
    request = create_job_request([shape_png("red")], template="none", **QUICK)
    change(request)
    with grpc.insecure_channel(trainer.target) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateJob(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.value.details() and message in refused.value.details()


# ---------------------------------------------------------------------------- buckets
def test_buckets_keep_about_the_pixel_count_and_the_unet_s_multiples():
    for resolution, step in ((512, 64), (1024, 64), (32, 4)):
        shapes = buckets(resolution, step)
        assert (resolution, resolution) in shapes
        for width, height in shapes:
            assert width % step == 0 and height % step == 0
            assert 0.75 * resolution**2 <= width * height <= resolution**2
            assert max(width, height) / min(width, height) <= 4
    assert bucket_for((1200, 800), buckets(512, 64)) == (640, 384)
    assert bucket_for((800, 1200), buckets(512, 64)) == (384, 640)


class RecordingTrainer(Trainer):
    """Records the latents of every batch the denoiser is asked to predict (FLUX.1's
    transformer sees them packed in 2x2 patches, with their rows' and columns' ids)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shapes: list[tuple[int, ...]] = []

    def _loss(self, denoiser, text_encoders, batch, generator, t_fraction):
        self.shapes.append(tuple(batch.latents.shape))
        return super()._loss(denoiser, text_encoders, batch, generator, t_fraction)


@pytest.mark.parametrize("model", ["tiny_model", "tiny_flux"])
def test_bucket_shapes_reach_the_denoiser_uncropped(
    model: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    wide = Image.new("RGB", (40, 24), "white")
    tall = Image.new("RGB", (24, 40), "white")
    examples = [InstanceExample(wide, "wide.png"), InstanceExample(tall, "tall.png")]
    path = str(request.getfixturevalue(model))
    seen = {}
    for bucketing in (True, False):
        options = {**QUICK, "max_train_steps_ti": 0, "max_train_steps_tuning": 12}
        config = TrainingConfig(
            pretrained_model_name_or_path=path, train_batch_size=2,
            aspect_ratio_bucketing=bucketing, device="cpu", **options,
        )  # fmt: skip
        trainer = RecordingTrainer(config, examples, RunPaths(tmp_path / f"c{bucketing}",
                                                              tmp_path / "a"))  # fmt: skip
        trainer.run()
        seen[bucketing] = set(trainer.shapes)
    # Both tiny VAEs halve each side: 40x24 pixels are 20x12 latents, batched two by two
    # (FLUX.1's size step, 4 pixels, divides 40 and 24 too).
    assert seen[True] == {(2, 4, 12, 20), (2, 4, 20, 12)}
    assert seen[False] == {(2, 4, 16, 16)}  # centre-cropped squares


# ---------------------------------------------------------------------------- what is learned
def learned_where(tmp_path: Path, masked: bool) -> float:
    """How much of what the LoRA changes in the UNet's prediction of the training image lies
    on the subject: its mean squared change on the mask over that off it."""
    _, image, _, mask = staged_concept_examples("busy", 1)[0]
    config = TrainingConfig(
        method="dreambooth_lora", instance_prompt="a sks circle", max_train_steps_tuning=60,
        learning_rate_unet=2e-3, train_text_encoder=False, random_flip=False, seed=0,
        save_steps=1000, device="cpu", mask_temperature=2.0,
    )  # fmt: skip
    example = InstanceExample(image, "busy.png", mask=mask if masked else None)
    trainer = Trainer(config, [example], RunPaths(tmp_path / f"c{masked}", tmp_path / "a"))
    trainer.run()
    unet, model = trainer.model.denoiser, trainer.model
    latents = trainer.data.latent_cache[0][0][None] * model.vae.config.scaling_factor
    hidden = model.encode(["a sks circle"]).hidden
    weights = (
        torch.nn.functional.interpolate(
            torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None],
            size=latents.shape[-2:],
        )[0, 0]
        > 0.5
    )
    changes = []
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            noisy = model.noise_scheduler.add_noise(latents, noise, torch.tensor([t]))
            unet.enable_adapters()
            tuned = unet(noisy, t, hidden).sample
            unet.disable_adapters()
            base = unet(noisy, t, hidden).sample
            changes.append(((tuned - base) ** 2).mean(dim=1)[0])
    change = torch.stack(changes).mean(0)
    return float(change[weights].mean() / change[~weights].mean())


def test_a_masked_run_learns_the_subject_more_than_the_background(tmp_path: Path):
    unmasked, masked = learned_where(tmp_path, False), learned_where(tmp_path, True)
    # Measured: 3.1 with the mask, 0.35 without (the background is most of the image).
    assert masked > 2 * unmasked, (masked, unmasked)
