"""Linters as tests: the tree stays ruff-clean (config in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    beside = Path(sys.executable).parent / "ruff"  # setup.sh installs it into the venv
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install ruff (setup.sh does)", pytrace=False)
    return found


def test_ruff_check() -> None:
    result = subprocess.run(
        [_ruff(), "check", "--no-cache", "qemu_unit", "tests", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _imports(path: Path) -> set[str]:
    """The qemu_unit modules PATH imports, at any depth (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "qemu_unit":
                out |= {alias.name for alias in node.names}
            elif node.module.startswith("qemu_unit."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qemu_unit.")}
    return out


def test_no_import_cycles() -> None:
    graph = {p.stem: _imports(p) for p in (REPO / "qemu_unit").glob("*.py")}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep != module:
                visit(dep, [*path, dep])

    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, sorted(set(cycles))
