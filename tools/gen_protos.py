"""Regenerate the Python gRPC stubs from protos/ into the client distribution.

python tools/gen_protos.py          # write client/loraforge/v1/*
python tools/gen_protos.py --check  # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"
PACKAGE_DIR = Path("loraforge") / "v1"
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")


def _plugin_path(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto under protos/; return the files written under out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(f"--plugin={name}={_plugin_path(name)}" for name in PLUGINS),
        *protos,
    ]
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args[1:]],
        capture_output=True,
        text=True,
        cwd=PROTO_ROOT,
    )
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stderr}")
    package = out_root / PACKAGE_DIR
    for init in (package.parent / "__init__.py", package / "__init__.py"):
        init.touch()
    return sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def stale_files() -> list[str]:
    """Names of generated files that differ from, or are missing in, the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = OUT_ROOT / rel
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                problems.append(str(rel))
        fresh_names = {p.relative_to(tmp) for p in fresh}
        for path in (OUT_ROOT / PACKAGE_DIR).glob("*_pb2*"):
            if path.relative_to(OUT_ROOT) not in fresh_names:
                problems.append(f"{path.relative_to(OUT_ROOT)} (no longer generated)")
        return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if stubs are stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale gRPC stubs (run `make protos`):", *stale, sep="\n  ")
            raise SystemExit(1)
        print("gRPC stubs are fresh")
        return
    for path in generate(OUT_ROOT):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
