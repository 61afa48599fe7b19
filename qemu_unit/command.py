"""Running a host tool (apt, dpkg, systemctl, busctl, qemu-img...): the one wrapper around
subprocess, with one environment policy and a clear error.

The environment: the caller's, with LC_ALL=C (callers parse the output, and messages
stay in one language), systemd's tools without pager or colours, and a PATH with the
system directories when the caller has none. Standard input is empty unless INPUT is
given: a tool never waits on the terminal.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from qemu_unit.errors import QemuUnitError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(QemuUnitError):
    """A tool that could not run or failed; DETAIL is what it said (stderr, else stdout)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def environment() -> dict[str, str]:
    return {"PATH": DEFAULT_PATH, **os.environ, "LC_ALL": "C", "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0"}


def run_bytes(cmd: Sequence[str], what: str, cwd: Path | None = None, *,
              input: bytes | None = None, timeout: float | None = None) -> bytes:
    """CMD's standard output; QemuUnitError saying WHAT failed, and how, otherwise.
    TIMEOUT (seconds): the tool is killed after it, and that is a failure too."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, check=False, env=environment(),
            input=input, stdin=subprocess.DEVNULL if input is None else None, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{what}: {cmd[0]} did not finish within {timeout:g}s") from e
    except OSError as e:
        problem = "is not installed" if isinstance(e, FileNotFoundError) else e.strerror
        raise CommandError(f"{what}: {cmd[0]} {problem}") from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise CommandError(f"{what}: {' '.join(cmd)} failed ({proc.returncode}): {detail}",
                           detail)
    return proc.stdout


def run(cmd: Sequence[str], what: str, cwd: Path | None = None, *,
        timeout: float | None = None) -> str:
    """CMD's standard output as text; see run_bytes."""
    return run_bytes(cmd, what, cwd, timeout=timeout).decode(errors="replace")
