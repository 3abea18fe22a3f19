"""The committed gRPC stubs are what protos/ generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_installing_the_client_pulls_no_torch(tmp_path: Path) -> None:
    """Resolve `pip install ./client` from scratch (dry run) and list what it would install."""
    import json

    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
         "--disable-pip-version-check", "--report", str(report), str(ROOT / "client")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    installed = {
        item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]
    }
    assert "loraforge-client" in installed
    assert not installed & {"torch", "diffusers", "transformers", "numpy", "peft", "accelerate"}
