"""The layout has one owner: qemu_unit/paths.py (issue 14).

Every path, unit name, socket and file name of the layout is written once, in
paths.py; a second module writing one of them as a literal is how two modules one
day disagree. Prose (docstrings, help texts, man pages) may name them: a string
with whitespace in it is prose, a string without is a name the code uses.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from qemu_unit import paths

PACKAGE = Path(__file__).resolve().parents[1] / "qemu_unit"
OWNER = PACKAGE / "paths.py"

# The layout's names as code spells them (pieces of f-strings included).
LAYOUT = (
    "qemu-run",
    "qemu-run@",
    "/run/qemu-run",
    "/var/lib/qemu-run",
    "/var/cache/qemu-run",
    "/var/log/qemu-run",
    "/etc/qemu-run",
    "lib/qemu-run",
    "_VARS.fd",
    "qemu-unit.lock",
    "status.json",
    "console.sock",
    "console-attach.sock",
    "agent.sock",
    "seed.iso",
    "image.qcow2",
    "image.base",
    "50-qemu-unit.conf",
    "probe.lock",
    "console.log",
    "qemu.conf",
)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string constant in PATH that is not prose."""
    tree = ast.parse(path.read_text(), str(path))
    prose = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in prose and not any(c.isspace() for c in node.value)
    ]


def _uses(text: str, name: str) -> bool:
    if name == "qemu-run":  # the user and directory name, not a longer name containing it
        return text == name or text.startswith(("qemu-run/", "qemu-run-"))
    return name in text


def test_every_layout_name_is_in_paths() -> None:
    """The list above names what paths.py owns, not something made up."""
    values = [os.fspath(v) for v in vars(paths).values() if isinstance(v, str | Path)]
    values += [os.fspath(p) for p in paths.SEARCH_PATH]
    values += [paths.unit_name("web"), paths.nvram_file("web"), os.fspath(paths.QEMU_CONF)]
    for name in LAYOUT:
        assert any(name in value for value in values), name


@pytest.mark.parametrize(
    "module", sorted(p for p in PACKAGE.rglob("*.py") if p != OWNER),
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_layout_literal_outside_paths(module: Path) -> None:
    found = [
        f"{module.relative_to(PACKAGE)}:{line}: {text!r} ({name})"
        for line, text in code_strings(module)
        for name in LAYOUT
        if _uses(text, name)
    ]
    assert found == [], "layout names belong in qemu_unit/paths.py"
