"""The training engine without gRPC: it really learns, and it runs data parallel."""

from __future__ import annotations

import ast
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from loraforge_core.bundle import read_bundle
from loraforge_core.models import load_pipeline
from tests.helpers import shape_png
from trainer_service.config import TrainingConfig
from trainer_service.events import (
    Checkpoint,
    FinalArtifact,
    ListReporter,
    Log,
    Progress,
    parse_line,
)
from trainer_service.jobdir import ImageUpload, JobDir
from trainer_service.training.data import InstanceExample
from trainer_service.training.evaluate import denoising_loss
from trainer_service.training.trainer import RunPaths, Trainer, train


def test_overfitting_one_image_lowers_its_denoising_loss(tiny_model: Path, tmp_path: Path) -> None:
    image = Image.open(io.BytesIO(shape_png("blue"))).convert("RGB")
    prompt = "a photo of sks object"
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), method="dreambooth_lora",
        instance_prompt=prompt, max_train_steps_tuning=150, save_steps=1000, lora_rank=8,
        learning_rate_unet=5e-3, learning_rate_text=1e-3, random_flip=False, seed=0,
        device="cpu",
    )  # fmt: skip
    bundle = Trainer(
        config, [InstanceExample(image, "blue.png")], RunPaths(tmp_path / "ckpt", tmp_path / "art")
    ).run()
    assert bundle is not None
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    base = denoising_loss(pipe, image, prompt)
    pipe.load_lora_weights(bundle.path)
    trained = denoising_loss(pipe, image, prompt)
    assert trained < 0.85 * base, (base, trained)


def test_train_runs_from_python_without_the_service_and_resumes(tiny_model, tmp_path) -> None:
    service = ["grpc", *(f"trainer_service.{m}" for m in
               ("server", "service", "store", "database", "worker", "jobs", "jobdir"))]  # fmt: skip
    code = ("import sys, trainer_service.training.trainer; "
            f"print(sorted(set(sys.modules) & {set(service)!r}))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]", loaded  # the library needs none of the service
    image = Image.open(io.BytesIO(shape_png("blue"))).convert("RGB")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), max_train_steps_ti=2,
        max_train_steps_tuning=3, save_steps=3, seed=0, device="cpu",
    )  # fmt: skip
    events: list = []
    bundle = train(config, [image, image], tmp_path / "run", events.append)
    assert bundle.manifest.global_step == 5 and bundle.path.parent == tmp_path / "run" / "artifacts"
    assert [e.global_step for e in events if isinstance(e, Checkpoint)] == [3]
    assert [e.artifact_id for e in events if isinstance(e, FinalArtifact)] == [bundle.id]
    assert max(e.global_step for e in events if isinstance(e, Progress)) == 5
    again: list = []
    resumed = train(config, [image, image], tmp_path / "run", again.append)
    assert any(isinstance(e, Log) and "resumed from checkpoint at step 3" in e.message
               for e in again)  # fmt: skip
    assert min(e.global_step for e in again if isinstance(e, Progress)) == 4
    assert resumed.id == bundle.id  # the same steps from the same state: the same bundle


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_flux"])  # SD's: test_trainer_service's, over gRPC
def test_two_process_data_parallel_run_on_cpu(
    model: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(model)
    job = JobDir(tmp_path / "job")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(path),
        max_train_steps_ti=2,
        max_train_steps_tuning=3,
        save_steps=2,
        gradient_accumulation_steps=1,
        seed=3,
        device="cpu",
    )
    images = [ImageUpload(shape_png("green", offset=i), f"green_{i}.png") for i in range(4)]
    job.create(config, images)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "trainer_service.training.run",
         "--job-dir", str(job.path), "--artifacts-dir", str(tmp_path / "art")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    events = [parse_line(line) for line in result.stdout.splitlines()]
    finals = [e for e in events if isinstance(e, FinalArtifact)]
    assert len(finals) == 1, "only the main process reports"
    progress = [e.global_step for e in events if isinstance(e, Progress)]
    assert progress == [1, 2, 3, 4, 5]
    assert_two_ranks([e.message for e in events if isinstance(e, Log)])
    bundle = read_bundle(tmp_path / "art" / finals[0].artifact_id)
    assert bundle.manifest.tokens == ["<s1>"] and bundle.manifest.global_step == 5
    pipe = load_pipeline(str(path))  # the family's stock pipeline loads it
    pipe.load_lora_weights(bundle.path)


def assert_two_ranks(log: list[str]) -> None:
    """The training log names a world size of two and a first batch for each rank."""
    report = next(m for m in log if m.startswith("data parallel over"))
    assert report.startswith("data parallel over 2 process(es)"), report
    shards = ast.literal_eval(report.split("first batch per rank: ", 1)[1])
    assert len(shards) == 2 and all(len(shard) == 1 for shard in shards), shards


def test_events_and_checkpoints_of_a_library_run(tiny_model: Path, tmp_path: Path) -> None:
    image = Image.open(io.BytesIO(shape_png())).convert("RGB")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model),
        max_train_steps_ti=3,
        max_train_steps_tuning=3,
        save_steps=3,
        seed=0,
        device="cpu",
        continue_inversion=True,
        initializer_tokens=["<zero>"],
    )
    reporter = ListReporter()
    paths = RunPaths(tmp_path / "ckpt", tmp_path / "art")
    bundle = Trainer(config, [InstanceExample(image, "a.png")], paths, reporter).run()
    assert bundle is not None
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == [
        "step-0000003.pt",
        "step-0000006.pt",
    ]
    kinds = [type(e) for e in reporter.events]
    assert kinds.count(Checkpoint) == 2 and kinds[-1] is FinalArtifact
    # The inversion moved the zero-initialised token away from zero.
    assert bundle.embeddings()["<s1>"].norm() > 0


def test_each_pti_phase_follows_its_own_schedule_and_min_snr_trains(
    tiny_model: Path, tmp_path: Path
) -> None:
    image = Image.open(io.BytesIO(shape_png())).convert("RGB")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), max_train_steps_ti=4,
        max_train_steps_tuning=6, gradient_accumulation_steps=1, save_steps=100, seed=0,
        device="cpu", lr_scheduler="constant", lr_scheduler_lora="linear",
        lr_warmup_steps_lora=2, learning_rate_ti=5e-4, learning_rate_unet=1e-3,
        snr_gamma=5.0,
    )  # fmt: skip
    reporter = ListReporter()
    paths = RunPaths(tmp_path / "ckpt", tmp_path / "art")
    assert Trainer(config, [InstanceExample(image, "a.png")], paths, reporter).run() is not None
    progress = [e for e in reporter.events if isinstance(e, Progress)]
    inversion = [e.lr for e in progress if e.phase == "inversion"]
    tuning = [e.lr for e in progress if e.phase == "tuning"]
    assert inversion == pytest.approx([5e-4] * 4)  # constant
    # linear over 6 steps after 2 of warm-up: 0, 1/2, then 1, 3/4, 1/2, 1/4 of the rate
    assert tuning == pytest.approx([1e-3 * f for f in (0, 0.5, 1, 0.75, 0.5, 0.25)])
    assert all(math.isfinite(e.loss) for e in progress)  # min-SNR weights on v-prediction


def test_a_seed_decides_the_whole_run_the_initial_lora_included(tiny_model: Path, tmp_path: Path):
    from safetensors.torch import load_file

    image = Image.open(io.BytesIO(shape_png("blue"))).convert("RGB")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tiny_model), max_train_steps_ti=1,
        max_train_steps_tuning=1, save_steps=1000, seed=7, device="cpu",
    )  # fmt: skip
    weights = []
    for run in range(2):
        torch.manual_seed(run)  # whatever the process drew before
        bundle = Trainer(config, [InstanceExample(image, "blue.png")],
                         RunPaths(tmp_path / f"c{run}", tmp_path / f"a{run}")).run()  # fmt: skip
        weights.append(load_file(read_bundle(bundle.path).lora_path))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
