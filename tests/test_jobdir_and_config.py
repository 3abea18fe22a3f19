"""The job folder and the training config, without a server or a model."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest
from loraforge.v1 import trainer_pb2

from loraforge_core.errors import InvalidArgument
from tests.helpers import shape_png
from trainer_service import config as configs
from trainer_service import proto_mapping
from trainer_service.config import TrainingConfig
from trainer_service.jobdir import ImageUpload, JobDir
from trainer_service.jobs import JobSpec, validate


def test_a_job_folder_gives_back_its_images_captions_and_config(tmp_path: Path) -> None:
    job = JobDir(tmp_path / "job-1")
    config = TrainingConfig(lora_rank=8, seed=5, placeholder_tokens=["<k>"])
    uploads = [
        ImageUpload(shape_png("red"), "../../etc/passwd", "a <k> on white"),
        ImageUpload(shape_png("blue", offset=2), "", ""),
    ]
    job.create(config, uploads)
    assert job.config() == config
    examples = job.examples()
    assert [(e.filename, e.caption) for e in examples] == [
        ("../../etc/passwd", "a <k> on white"),
        ("", ""),
    ]
    assert examples[0].image.size == (32, 32)
    # Stored names cannot leave the folder, whatever the upload called itself.
    assert sorted(p.name for p in job.images.iterdir()) == ["0000-passwd", "0001-image-1.png"]


def test_the_training_lock_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    job = JobDir(tmp_path / "job-1")
    job.path.mkdir()
    held = job.lock()
    with open(job.lock_file) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.close()
    with open(job.lock_file) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_config_round_trips_and_refuses_unknown_options() -> None:
    config = TrainingConfig(method="dreambooth_lora", lora_unet_target_modules=["to_q"], seed=3)
    assert TrainingConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="unknown training options: warp"):
        TrainingConfig.from_dict({"warp": 9})


def test_validation_names_every_bad_field_at_once() -> None:
    config = TrainingConfig(
        lora_rank=0, max_train_steps_tuning=-1, placeholder_tokens=["s1"], snr_gamma=0.0,
        lr_scheduler_lora="warp", lr_warmup_steps_lora=-1, revision="main branch",
        placeholder_token_at_data="sks",
    )  # fmt: skip
    spec = JobSpec(request_id="bad id!", config=config, images=[ImageUpload(b"not an image")])
    with pytest.raises(InvalidArgument) as caught:
        validate(spec)
    fields = {v.field for v in caught.value.violations}
    assert {
        "request_id",
        "instance_images[0].data",
        "config.lora_rank",
        "config.max_train_steps_tuning",
        "config.snr_gamma",
        "config.lr_scheduler_lora",
        "config.lr_warmup_steps_lora",
        "config.revision",
        "config.placeholder_token_at_data",
    } <= fields
    assert "placeholder_tokens[0]" in fields  # a field of the request, not of its config


@pytest.mark.parametrize("token", ["<my.tok>", "<a b>", "<>", "<x>>", "tok"])
def test_placeholder_tokens_that_other_tools_would_rename_are_refused(token: str) -> None:
    config = TrainingConfig(placeholder_tokens=[token])
    spec = JobSpec(request_id="", config=config, images=[ImageUpload(shape_png())])
    with pytest.raises(InvalidArgument, match="no spaces or dots"):
        validate(spec)


def test_the_contract_and_the_config_name_the_same_choices() -> None:
    assert set(proto_mapping.METHODS.values()) == set(configs.METHODS)
    assert set(proto_mapping.TEMPLATES.values()) == set(configs.TEMPLATES)
    assert set(proto_mapping.LR_SCHEDULERS.values()) == set(configs.LR_SCHEDULERS)
    assert set(proto_mapping.PRECISIONS.values()) == set(configs.MIXED_PRECISIONS)
    config = proto_mapping.config_from_request(
        trainer_pb2.CreateJobRequest(
            method=trainer_pb2.TRAINING_METHOD_DREAMBOOTH_LORA,
            config=trainer_pb2.TrainingConfig(
                lr_scheduler=trainer_pb2.LR_SCHEDULER_COSINE, lora_rank=8, learning_rate_unet=3e-4,
                lr_scheduler_lora=trainer_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP,
                lr_warmup_steps_lora=7, snr_gamma=5.3, revision="v2.1",
                pretrained_vae_name_or_path="stabilityai/sd-vae-ft-mse",
                placeholder_token_at_data="sks|<s1>",
            ),
        )
    )  # fmt: skip
    assert (config.method, config.lr_scheduler, config.lora_rank) == (
        "dreambooth_lora",
        "cosine",
        8,
    )
    assert (config.lr_scheduler_lora, config.lr_warmup_steps_lora) == ("constant_with_warmup", 7)
    assert config.learning_rate_unet == 3e-4  # the decimal the caller wrote, not float32's
    assert config.snr_gamma == 5.3
    assert (config.revision, config.pretrained_vae_name_or_path) == (
        "v2.1", "stabilityai/sd-vae-ft-mse"
    )  # fmt: skip
    assert config.placeholder_token_at_data == "sks|<s1>"
    message = proto_mapping.config_to_proto(config.to_dict())
    assert message.lr_scheduler == trainer_pb2.LR_SCHEDULER_COSINE and message.lora_rank == 8
    assert message.lr_scheduler_lora == trainer_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP
    assert message.HasField("snr_gamma") and message.lr_warmup_steps_lora == 7
    assert message.revision == "v2.1" and message.placeholder_token_at_data == "sks|<s1>"
    # Unset: the seed's defaults, and no min-SNR weighting.
    default = proto_mapping.config_from_request(trainer_pb2.CreateJobRequest())
    assert (default.lr_scheduler_lora, default.lr_warmup_steps_lora) == ("linear", 0)
    assert default.snr_gamma is None
    assert not proto_mapping.config_to_proto(default.to_dict()).HasField("snr_gamma")
