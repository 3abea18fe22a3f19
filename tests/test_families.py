"""Model families: recognised from the model folder, and a family loraforge does not serve is
refused when a server starts on it or a job names it, with a message naming the family and
the supported ones (an SDXL folder used to start the generator, which then answered INTERNAL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge_core import families
from loraforge_core.launch import ServerProcess
from tests.helpers import write_model_index


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_index(tmp_path_factory.mktemp("models") / "sd3")


def test_the_family_comes_from_the_model_folder(tiny_model: Path, tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    assert families.detect(str(tiny_model)) is families.SD
    assert families.detect(str(tiny_sdxl)) is families.SDXL
    # The tiny SDXL is a real one: diffusers' own pipeline class loads and runs it.
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert families.detect(str(tiny_model / "missing")) is None


def _refused_at_start(kind: str, model: Path, tmp_path: Path) -> str:
    server = ServerProcess(kind, data_dir=tmp_path / kind, model=str(model)).start()
    assert server.process is not None
    assert server.process.wait(120) != 0
    return server.log()


def test_the_generator_refuses_a_family_it_does_not_serve(sd3_folder, tmp_path) -> None:
    log = _refused_at_start("generator", sd3_folder, tmp_path)
    assert (
        "is Stable Diffusion 3 (StableDiffusion3Pipeline), which the loraforge generator "
        "does not support"
    ) in log
    assert (
        "supported families: Stable Diffusion 1.x/2.x (sd), Stable Diffusion XL (sdxl), "
        "FLUX.1 (flux)"
    ) in log
    assert "Traceback" not in log  # the operator's problem, said once, not our crash


def test_the_trainer_refuses_a_family_it_does_not_train(sd3_folder, tmp_path) -> None:
    log = _refused_at_start("trainer", sd3_folder, tmp_path)
    assert "is Stable Diffusion 3 (StableDiffusion3Pipeline), which the loraforge trainer" in log
    assert (
        "supported families: Stable Diffusion 1.x/2.x (sd), Stable Diffusion XL (sdxl), "
        "FLUX.1 (flux)"
    ) in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_the_generator_serves_an_sdxl_model(tiny_sdxl: Path, tmp_path: Path) -> None:
    """It used to start on an SDXL folder and answer INTERNAL to LoadAdapter."""
    from loraforge_client import GeneratorClient

    from trainer_service.training.lora import random_lora_bundle

    bundle = random_lora_bundle(str(tiny_sdxl), tmp_path / "bundles", seed=1)
    with (
        ServerProcess("generator", data_dir=tmp_path / "g", model=str(tiny_sdxl)) as server,
        GeneratorClient(server.target) as client,
    ):
        client.load_adapter("xl", bundle.path)
        assert [(a.adapter_id, a.family) for a in client.list_adapters()] == [("xl", "sdxl")]
        images = client.generate("a red circle", adapters=[("xl", 0.8)], steps=2, seed=3)
        assert len(images) == 1 and images[0].width == 32
