"""The one error type libraries raise; only the edges turn it into an exit status."""

from __future__ import annotations

import os


class QemuUnitError(Exception):
    """An error that names where it comes from: file, line and key when known."""

    exit_status = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.line = line
        self.key = key

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
            where += ": "
        key = f"{self.key}=: " if self.key else ""
        return f"{where}{key}{self.message}"


class ConfigError(QemuUnitError):
    """Bad input: a restart cannot fix it."""

    # sysexits.h EX_CONFIG (78), in the unit's RestartPreventExitStatus=.
    exit_status = os.EX_CONFIG
