"""Where messages go: the journal under systemd, stderr everywhere else."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

LOGGER = "qemu_unit"
RUNNER_IDENTIFIER = "qemu-unit"
CONSOLE_IDENTIFIER = "qemu-unit-console"

log = logging.getLogger(LOGGER)


def journal_connected() -> bool:
    """True when stderr is systemd's journal stream (JOURNAL_STREAM is dev:inode of it)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class VMFields(logging.Filter):
    """Adds the structured fields (VM name, domain UUID) to every record."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            setattr(record, key, value)
        return True


FIELDS = VMFields()


def setup(verbose: bool = False) -> None:
    handler: logging.Handler
    if journal_connected():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER=RUNNER_IDENTIFIER)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qemu-unit: %(message)s"))
    handler.addFilter(FIELDS)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def set_vm_fields(name: str, uuid: str | None = None) -> None:
    FIELDS.fields["QEMU_UNIT_VM"] = name
    if uuid:
        FIELDS.fields["QEMU_UNIT_UUID"] = uuid


def console_sink(name: str) -> Callable[[str], None]:
    """A function that records one line of the guest's console."""
    if journal_connected():
        from systemd import journal

        def to_journal(line: str) -> None:
            journal.send(
                line,
                PRIORITY=str(6),
                SYSLOG_IDENTIFIER=CONSOLE_IDENTIFIER,
                **FIELDS.fields,
            )

        return to_journal

    def to_stderr(line: str) -> None:
        print(f"{name} console: {line}", file=sys.stderr, flush=True)

    return to_stderr
