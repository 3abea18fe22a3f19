from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Under pytest-xdist the cores are shared between the workers: one torch thread each (and in
# every server a worker starts) instead of each worker's threads fighting for all the cores.
# The tiny models gain 8% from a second thread, and a second worker nearly doubles throughput.
# Set before anything imports torch, which reads it once.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per core and one more. Tests wait on servers and training
    processes for a tenth of their time; a spare worker computes meanwhile (2 cores: the
    suite in 767 s with 3 workers, 808 s with 2)."""
    return (os.cpu_count() or 1) + 1


DURATIONS = Path(__file__).with_name("durations.json")  # seconds per module, measured


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-durations", action="store_true",
        help="write the seconds each module that ran took into tests/durations.json",
    )  # fmt: skip


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first. ``make test`` hands whole modules to the workers in this
    order (``--dist loadscope``), so the long ones start at once and the short ones fill in
    around them, instead of a long module starting last and running alone. Seconds come from
    tests/durations.json; a module it does not list yet goes first if it has slow tests and
    last otherwise. The sort is stable: each module's tests stay in file order, sharing their
    module fixtures (a server, a pipeline) and seeing the state earlier tests left."""
    measured = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    slow = {_module(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def seconds(item: pytest.Item) -> float:
        module = _module(item.nodeid)
        return measured.get(module, math.inf if module in slow else 0.0)

    items.sort(key=seconds, reverse=True)


_took: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _took[_module(report.nodeid)] = _took.get(_module(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if not config.getoption("--record-durations") or hasattr(config, "workerinput"):
        return  # under xdist the controller, which sees every worker's reports, writes
    measured = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    measured |= {module: round(took, 1) for module, took in _took.items()}
    ordered = dict(sorted(measured.items(), key=lambda pair: -pair[1]))
    DURATIONS.write_text(json.dumps(ordered, indent=1) + "\n")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models built on first use go to a per-run cache, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["LORAFORGE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


# The libraries both services import, with every family's classes (the services' own modules
# import in a tenth of a second, and would carry their metrics into the other's servers).
PRELOADS = ["loraforge_core.models:preload", "accelerate", "diffusers.optimization",
            "diffusers.training_utils"]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def forkserver(isolated_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers the tests start fork from a process that imported torch and diffusers once
    (loraforge_core.forkserver): a generator then starts on 1.6 s of CPU instead of 6.9 s,
    and a trainer's zygote on none instead of 6 s. It preloads while the first tests run."""
    from loraforge_core import forkserver

    path = tmp_path_factory.mktemp("forkserver") / "socket"
    process = forkserver.start(path, PRELOADS)
    os.environ[forkserver.ENV] = str(path)
    yield
    del os.environ[forkserver.ENV]
    assert process.stdin is not None
    process.stdin.close()
    process.wait()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge_core.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL (random weights), built locally like the tiny SD."""
    from loraforge_core.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1 (random weights, dev-like: guidance embedded), built locally."""
    from loraforge_core.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Z-Image (random weights), built locally."""
    from loraforge_core.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-zimage", family="zimage")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator:
    """One PostgreSQL cluster for the run; tests take fresh databases from it."""
    from tests.services import throwaway_postgres

    with throwaway_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs once per job-store backend: "" is SQLite."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One S3-compatible server (SeaweedFS) for the run; tests take fresh prefixes in it."""
    from tests.services import SeaweedS3, running

    with running(SeaweedS3(tmp_path_factory.mktemp("s3"))) as server:
        yield server


@pytest.fixture
def s3_url(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh s3:// prefix, with this process's AWS_* pointing at the test server."""
    import uuid

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.bucket}/t{uuid.uuid4().hex[:12]}"
