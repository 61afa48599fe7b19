"""Running a host tool (apt, dpkg, systemctl...): one wrapper, with a clear error."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from qemu_unit.errors import QemuUnitError


def run(cmd: Sequence[str], what: str, cwd: Path | None = None) -> str:
    """CMD's standard output; QemuUnitError saying WHAT failed, and how, otherwise.

    LC_ALL=C: callers parse the output, and messages stay in one language.
    """
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as e:
        raise QemuUnitError(f"{what}: {cmd[0]} is not installed") from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise QemuUnitError(f"{what}: {' '.join(cmd)} failed ({proc.returncode}): {detail}")
    return proc.stdout
