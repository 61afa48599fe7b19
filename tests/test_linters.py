"""Linters as tests: the tree stays ruff-clean (config in pyproject.toml)."""

from __future__ import annotations

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
