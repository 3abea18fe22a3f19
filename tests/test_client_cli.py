"""The client library and the `loraforge` CLI against real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loraforge.v1 import trainer_pb2
from loraforge_client import (
    AsyncGeneratorClient,
    AsyncTrainerClient,
    GeneratorClient,
    InvalidArgumentError,
    NotFoundError,
    TrainerClient,
)
from PIL import Image

from loraforge_core.launch import ServerProcess
from tests.helpers import shape_png

FAST = [
    "--max-train-steps-ti",
    "3",
    "--max-train-steps-tuning",
    "3",
    "--save-steps",
    "3",
    "--gradient-accumulation-steps",
    "1",
]


@pytest.fixture(scope="module")
def servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("services")
    with (
        ServerProcess("trainer", data_dir=data / "trainer", model=str(tiny_model)) as trainer,
        ServerProcess("generator", data_dir=data / "generator", model=str(tiny_model)) as generator,
    ):
        yield trainer, generator


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        (folder / f"red_{i}.png").write_bytes(shape_png("red", offset=i))
    (folder / "red_0.txt").write_text("a photo of <s> on white")
    return folder


def cli(servers, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    trainer, generator = servers
    env = {
        **os.environ,
        "LORAFORGE_TRAINER": trainer.target,
        "LORAFORGE_GENERATOR": generator.target,
    }
    result = subprocess.run(
        [sys.executable, "-m", "loraforge_client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


EVALUATE = ["--evaluation-scales", "0", "1", "--evaluation-images", "1", "--evaluation-steps",
            "2", "--evaluation-scorer", "toy_world", "--select-final", "best"]  # fmt: skip


@pytest.mark.slow
def test_cli_trains_watches_downloads_and_generates(servers, images, tmp_path):
    trained = cli(servers, "train", str(images), "--token", "<s1>", "--watch", *FAST, *EVALUATE)
    job_id, artifact_id = trained.stdout.split()
    assert "tuning" in trained.stderr and "it/s" in trained.stderr and "ETA" in trained.stderr
    assert f"final artifact: {artifact_id}" in trained.stderr
    # Each checkpoint's evaluation as a table, the recommended scale marked.
    assert trained.stderr.count("scale  subject  prompt  images") == 2, trained.stderr
    assert "evaluation at step 3 (toy_world" in trained.stderr
    assert "<- recommended" in trained.stderr
    with TrainerClient(servers[0].target) as client:
        job = client.get_job(job_id)
        request = trainer_pb2.GetArtifactRequest(artifact_id=artifact_id)
        artifact = client.stub.GetArtifact(request, timeout=30)
    assert job.best_artifact_id == artifact_id  # select_final best
    assert artifact.evaluation.global_step in (3, 6)  # the curve travels with the bundle
    assert [s.scale for s in artifact.evaluation.scores] == [0.0, 1.0]
    assert job_id in cli(servers, "jobs").stdout
    folder = tmp_path / "bundle"
    cli(servers, "download", artifact_id, "-o", str(folder))
    assert (folder / "manifest.json").is_file()
    loaded = cli(servers, "adapters", "load", "mine", str(folder))
    assert "<s1>" in loaded.stdout
    header, *rows = cli(servers, "adapters", "ls").stdout.splitlines()
    assert header.split()[4] == "FAMILY" and header.split()[6] == "SCALE"
    (mine,) = [row.split() for row in rows if row.split()[0] == "mine"]
    assert mine[4] == "sd" and float(mine[6]) in (0.0, 1.0)  # its recommended scale
    out = cli(
        servers,
        "generate",
        "a photo of a <s1>",
        "--adapter",
        "mine:0.8x:0.5x",  # multiples of its recommended scale
        "--seed",
        "5",
        "-n",
        "2",
        "--steps",
        "4",
        "-o",
        str(tmp_path / "png"),
    )
    paths = [Path(line.split()[0]) for line in out.stdout.splitlines()]
    assert [line.split("seed=")[1] for line in out.stdout.splitlines()] == ["5", "6"]
    for path in paths:
        assert Image.open(path).size == (32, 32)
    # Inpainting from the CLI (what it renders is test_img2img_inpainting's): the init size.
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.open(paths[0]).resize((40, 24)).save(init)
    half = Image.new("L", (40, 24), 0)
    half.paste(255, (20, 0, 40, 24))
    half.save(mask)
    out = cli(servers, "generate", "a red circle", "--init-image", str(init),
              "--mask-image", str(mask), "--strength", "0.9", "--steps", "4",
              "-o", str(tmp_path / "i"))  # fmt: skip
    assert Image.open(out.stdout.split()[0]).size == (40, 24)
    bad = cli(servers, "generate", "x", "--init-image", str(init), "--strength", "2", check=False)
    assert bad.returncode == 1 and "strength" in bad.stderr and "Traceback" not in bad.stderr
    # The flag reaches the server, which runs SD (FLUX.1's is test_flux_serving's).
    t5 = cli(servers, "generate", "x", "--max-sequence-length", "64", check=False)
    assert t5.returncode == 1 and "max_sequence_length" in t5.stderr and "fixed" in t5.stderr


def test_cli_errors_are_one_clear_line(servers, images):
    bad = cli(servers, "train", str(images), "--token", "nobrackets", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "placeholder_tokens[0]" in bad.stderr
    missing = cli(servers, "generate", "x", "--adapter", "nope", check=False)
    assert missing.returncode == 1 and "adapter 'nope' not found" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_library_typed_errors_and_async_twins(servers, images):
    trainer, generator = servers
    with TrainerClient(trainer.target) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            client.create_job_from_folder(images, placeholder_tokens=["bad token"])
        assert caught.value.field_violations[0].field == "placeholder_tokens[0]"
        with pytest.raises(NotFoundError):
            client.get_job("job-missing")

    async def scenario():
        async with (
            AsyncTrainerClient(trainer.target) as t,
            AsyncGeneratorClient(generator.target) as g,
        ):
            job = await t.create_job_from_folder(
                images, max_train_steps_ti=2, max_train_steps_tuning=2, save_steps=2
            )
            finished = await t.wait(job.job_id)
            jobs = [j async for j in t.list_jobs(state="succeeded")]
            images_ = await g.generate("a red circle", steps=3, seed=1)
            return finished, jobs, images_

    finished, jobs, generated = asyncio.run(scenario())
    assert finished.state == "succeeded" and finished.job_id in {j.job_id for j in jobs}
    assert generated[0].seed == 1 and generated[0].data.startswith(b"\x89PNG")
    with GeneratorClient(generator.target) as client:
        same = client.generate("a red circle", steps=3, seed=1)
    assert same[0].data == generated[0].data


@pytest.mark.slow
def test_watch_survives_a_server_restart(tiny_model: Path, tmp_path: Path, images):
    server = ServerProcess("trainer", data_dir=tmp_path, model=str(tiny_model)).start()
    server.wait_serving()
    with TrainerClient(server.target) as client:
        job = client.create_job_from_folder(
            images, max_train_steps_ti=5, max_train_steps_tuning=40, save_steps=5
        )
        seen = []
        restarted = False
        for event in client.watch(job.job_id):
            seen.append(event.sequence)
            if not restarted and event.kind == "checkpoint":
                server.terminate()
                time.sleep(0.5)
                server = ServerProcess(
                    "trainer", data_dir=tmp_path, model=str(tiny_model), port=server.port
                ).start()
                restarted = True
        assert seen == list(range(1, len(seen) + 1))
        assert client.get_job(job.job_id).state == "succeeded"
    server.terminate()
