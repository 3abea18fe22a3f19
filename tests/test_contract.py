"""The committed gRPC stubs are what protos/ generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_client_distribution_does_not_depend_on_torch() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps["dependencies"]}
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}


@pytest.mark.slow
def test_client_installs_alone_without_torch_and_its_cli_runs(tmp_path: Path) -> None:
    """`pip install ./client` in a fresh venv: no torch, and `loraforge --help` works."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    # A non-editable copy, so the build does not touch the checkout.
    source = tmp_path / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    result = subprocess.run(
        [*pip, "install", "--quiet", str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installed = subprocess.run(
        [*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "loraforge-client" in names
    assert not names & {"torch", "diffusers", "transformers", "numpy", "peft", "accelerate"}
    help_text = subprocess.run(
        [str(venv / "bin" / "loraforge"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "generate" in help_text and "train" in help_text


def test_the_services_and_the_client_name_every_enum_member_alike() -> None:
    from loraforge.v1 import common_pb2, generator_pb2, trainer_pb2
    from loraforge_client.enums import by_name

    from loraforge_core.proto_enums import enum_numbers

    for module in (common_pb2, generator_pb2, trainer_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name)[1:] + "_"
            wrapper = getattr(module, enum.name)
            assert all(name.startswith(prefix) for name in enum.values_by_name), (enum.name, prefix)
            assert enum_numbers(wrapper, prefix) == by_name(wrapper, prefix), enum.name
