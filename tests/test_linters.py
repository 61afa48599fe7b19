"""Linters as tests: the tree stays ruff-clean and mypy-strict-clean (config in
pyproject.toml), imports follow the package boundaries and make no cycle."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check() -> None:
    result = subprocess.run(
        [_tool("ruff"), "check", "--no-cache", "qemu_unit", "tests", "bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # setup.sh installs it into the venv
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install {name} (setup.sh does)",
                    pytrace=False)
    return found


def test_mypy_strict() -> None:
    result = subprocess.run(
        [_tool("mypy"), "--no-incremental", "--cache-dir=/dev/null"],  # files: pyproject.toml
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


PACKAGE = REPO / "qemu_unit"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The qemu_unit modules PATH imports, at any depth (function-level imports too):
    `from qemu_unit.vm import host` counts as qemu_unit.vm.host."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            "qemu_unit"
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("qemu_unit")}
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _package(module: str) -> str:
    """qemu_unit.vm.host -> vm; a top-level module (errors, paths...) -> its own name."""
    return module.split(".")[1] if module.count(".") else ""


# Which packages each package may import (top-level modules are shared by all; the
# generator and config only the ones that load nothing heavy).
ALLOWED = {
    "config": {"config", "errors", "paths", "records"},
    "generator": {"config", "generator", "errors", "paths", "records"},
    "images": {"config", "images", "vm", "errors", "paths", "records", "log", "command"},
    "vm": {"config", "vm", "images", "errors", "paths", "records", "log", "command", "startup"},
    "cli": {"cli", "config", "generator", "images", "vm", "errors", "paths", "records", "log",
            "command", "startup"},
}


def test_imports_follow_the_package_boundaries() -> None:
    """config imports none of the others; the generator only config (never libvirt);
    vm never imports cli."""
    broken = [
        f"{module} imports {dep}"
        for module, deps in sorted(_graph().items())
        if _package(module) in ALLOWED
        for dep in sorted(deps)
        if _package(dep) not in ALLOWED[_package(module)]
    ]
    assert broken == []
    for path in [*(PACKAGE / "config").rglob("*.py"), *(PACKAGE / "generator").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("libvirt", "systemd")}, path


def test_no_import_cycles() -> None:
    # A package's __init__ importing its own modules is not a cycle of modules.
    graph = {m: {d for d in deps if d != m} for m, deps in _graph().items()}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            else:
                visit(dep, [*path, dep])

    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, sorted(set(cycles))


def test_subprocess_only_through_command_run() -> None:
    """One environment policy for every host tool: qemu_unit/command.py's."""
    users = sorted(
        str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
        if path.name != "command.py" or path.parent != PACKAGE
        if any(isinstance(n, ast.Import | ast.ImportFrom)
               and ("subprocess" in {a.name for a in n.names}
                    or getattr(n, "module", None) == "subprocess")
               for n in ast.walk(ast.parse(path.read_text())))
    )
    assert users == []
