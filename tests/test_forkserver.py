"""The forkserver the tests start servers from (loraforge_core.forkserver): a forked server is
what an exec'd one is (arguments, environment, folder, command line, stdin, exit status), and
a caller whose environment the preloaded libraries would read differently is refused."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from loraforge_core import forkserver


def spawn(tmp_path: Path, code: str, env: dict[str, str]) -> forkserver.ForkedServer | None:
    with open(tmp_path / "out", "ab") as out:
        return forkserver.spawn("tests.fork_probe", [code], env, out.fileno())


def test_a_forked_child_sees_what_an_exec_d_one_would(tmp_path: Path) -> None:
    child = spawn(tmp_path, "7", {**os.environ, "PROBE": "set by the caller"})
    assert child is not None
    assert child.wait(timeout=120) == 7
    seen = json.loads((tmp_path / "out").read_text())
    assert seen["argv"] == ["7"]
    assert seen["probe"] == "set by the caller"
    assert seen["cwd"] == os.getcwd()
    # as ps shows it (setproctitle writes one string where exec writes one per argument)
    assert " ".join(seen["cmdline"]).split() == [sys.executable, "-m", "tests.fork_probe", "7"]
    assert seen["stdin"] == ""  # /dev/null, not the forkserver's stdin
    assert seen["parent"] != os.getpid()  # the forkserver's child


def test_a_killed_child_reports_the_signal_as_popen_does(tmp_path: Path) -> None:
    child = spawn(tmp_path, "wait", dict(os.environ))
    assert child is not None
    while not (tmp_path / "out").read_text():  # started: it has printed what it saw
        assert child.poll() is None
    child.kill()
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert child.poll() == -signal.SIGKILL


def test_an_environment_the_imports_would_read_otherwise_is_refused(tmp_path: Path) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    # What the imports set themselves (torch's, in this process too once it used inductor)
    # is what the forkserver's imports set: accepted.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir()}
    accepted = spawn(tmp_path, "0", env)
    assert accepted is not None and accepted.wait(timeout=120) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "0" if os.environ.get("HF_HUB_OFFLINE") else "1"}
    with pytest.warns(UserWarning, match="the libraries read HF_HUB_OFFLINE as they are imp"):
        assert spawn(tmp_path, "0", env) is None  # the caller exec's instead
    no_forkserver = {k: v for k, v in os.environ.items() if k != forkserver.ENV}
    assert spawn(tmp_path, "0", no_forkserver) is None


def test_a_preload_of_a_service_module_is_refused(tmp_path: Path) -> None:
    """What a service module sets up as it is imported (the generator's metrics) must not be
    in a trainer forked from the same forkserver: preloads are libraries only."""
    process = forkserver.start(tmp_path / "socket", ["inference_service.metrics"])
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert "preload libraries only" in (tmp_path / "socket.log").read_text()
