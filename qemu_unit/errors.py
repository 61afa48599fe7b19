"""The one error type libraries raise; only the edges turn it into an exit status."""

from __future__ import annotations

import os

# Names for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class Origin(Protocol):
        """Where a value was written: unitfile.Entry is one (file, line, key)."""

        @property
        def path(self) -> str: ...
        @property
        def line(self) -> int: ...
        @property
        def key(self) -> str: ...


class QemuUnitError(Exception):
    """An error that names where it comes from: file, line and key when known.

    ENTRY (the assignment at fault, or None) gives all three; PATH, LINE and KEY,
    when given, say it otherwise or more precisely."""

    exit_status = 1

    def __init__(
        self,
        message: str,
        *,
        entry: Origin | None = None,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if entry is not None:
            path, line, key = path or entry.path, line or entry.line, key or entry.key
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
