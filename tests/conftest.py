from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models built on first use go to a per-run cache, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["LORAFORGE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge_core.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
