"""The import graph of the product: no cycle, and loraforge_core (shared by both services)
imports neither service nor the client library. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"loraforge_core": ROOT, "trainer_service": ROOT, "inference_service": ROOT,
            "loraforge_client": ROOT / "client"}  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for package, base in PACKAGES.items():
        for path in (base / package).rglob("*.py"):
            name = ".".join(path.relative_to(base).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def test_shared_code_imports_neither_service_nor_the_client() -> None:
    arrows = [(a, b) for a, targets in import_graph().items() for b in targets
              if a.startswith("loraforge_core") and not b.startswith("loraforge_core")]  # fmt: skip
    assert arrows == []


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(" -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
