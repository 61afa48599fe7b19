"""Where messages go: the journal under systemd, stderr everywhere else.

Nothing here may hold up the runner when journald does not read (stopped, hung,
swamped): systemd-python's `journal.send` keeps Python's GIL while sendmsg() waits
for a full journal socket, so one blocked message froze every thread of the runner
(console reader, main loop, watchdog) until systemd killed it. Entries go out through
`JournalSocket` instead (journald's native protocol on a socket of our own, which
waits without the GIL), the runner's own records from a thread of their own behind a
bounded queue (`Background`), and the console's from its sender thread.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

LOGGER = "qemu_unit"
RUNNER_IDENTIFIER = "qemu-unit"
CONSOLE_IDENTIFIER = "qemu-unit-console"
# journald's native protocol socket (systemd.journal-fields(7), JOURNAL_NATIVE_PROTOCOL).
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Runner records waiting for the journal; beyond this they are counted, not kept.
MAX_QUEUED_RECORDS = 1000
# How long the last records may hold up the exit of a runner whose journal is stuck.
EXIT_FLUSH_SECONDS = 5.0
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

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


class JournalSocket:
    """Entries to journald by its native protocol; a full socket blocks only the caller.

    A datagram per entry to JOURNAL_SOCKET (by path, so a restarted journald is found
    again), as sd_journal_sendv() does, but sent by Python's socket module, which
    releases the GIL while the kernel waits for journald to read.
    """

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            # As libsystemd does: room for large entries (the kernel caps it at wmem_max).
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024**2)
        except OSError:
            pass

    def send(self, message: str | bytes, /, **fields: object) -> None:
        """One entry: MESSAGE and FIELDS (names as journald takes them; others are left out).
        Raises OSError when journald cannot be reached."""
        self._sock.sendto(encode_entry(message, fields), self.path)

    def close(self) -> None:
        self._sock.close()


def encode_entry(message: str | bytes, fields: dict[str, object]) -> bytes:
    """journald's native serialisation: `NAME=value\n`, or for values with a newline
    `NAME\n` + 64-bit little-endian length + value + `\n`."""
    parts = []
    for name, value in (("MESSAGE", message), *fields.items()):
        if not _FIELD_NAME.fullmatch(name):
            continue  # journald would drop it (JournalHandler passes LogRecord attributes)
        data = value if isinstance(value, bytes) else str(value).encode(errors="replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class Background(logging.Handler):
    """Hands records to TARGET from a thread of its own: logging never waits for TARGET.

    At most MAX_QUEUED_RECORDS wait; more are counted, and once TARGET takes records
    again one warning says how many were lost. TARGET may be a function that makes it:
    the thread calls it at the first record.
    """

    def __init__(self, target: logging.Handler | Callable[[], logging.Handler],
                 limit: int = MAX_QUEUED_RECORDS) -> None:
        super().__init__()
        self.target = target
        self.limit = limit
        self.dropped = 0
        self._cond = threading.Condition()
        self._queue: collections.deque[logging.LogRecord] = collections.deque()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="log-journal", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Formatted now: its arguments may change (or go) before the thread gets to it.
        record.msg, record.args = record.getMessage(), None
        with self._cond:
            if len(self._queue) >= self.limit:
                self.dropped += 1
                return
            self._queue.append(record)
            self._cond.notify()

    def _run(self) -> None:
        target = self.target
        while True:
            with self._cond:
                while not self._queue:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                self._busy = True
                record = self._queue.popleft()
                dropped, self.dropped = self.dropped, 0
            if not isinstance(target, logging.Handler):
                try:
                    target = target()
                except Exception as e:
                    # systemd-python broken: stderr is the journal's stream too.
                    target = logging.StreamHandler(sys.stderr)
                    target.handle(logging.LogRecord(
                        record.name, logging.WARNING, __file__, 0,
                        f"no journal handler ({type(e).__name__}: {e}): logging to stderr",
                        None, None))
                self.target = target
            if dropped:
                lost = logging.LogRecord(record.name, logging.WARNING, __file__, 0,
                                         f"{dropped} runner messages were lost: the journal "
                                         f"did not take them", None, None)
                lost.__dict__.update(FIELDS.fields)
                target.handle(lost)
            target.handle(record)

    def wait_sent(self, timeout: float) -> bool:
        """Wait until every queued record went out, at most TIMEOUT seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def flush(self) -> None:
        # logging calls this at exit: a stuck journal delays the exit that long, no longer.
        self.wait_sent(EXIT_FLUSH_SECONDS)


def journal_handler(path: str = JOURNAL_SOCKET) -> logging.Handler:
    """systemd-python maps a record to journal fields; JournalSocket sends them."""
    from systemd.journal import JournalHandler

    handler: logging.Handler = JournalHandler(sender_function=JournalSocket(path).send,
                                              SYSLOG_IDENTIFIER=RUNNER_IDENTIFIER)
    return handler


def setup(verbose: bool = False) -> None:
    handler: logging.Handler
    if journal_connected():
        # Made by the journal thread: importing systemd.journal (~4 ms) need not hold up
        # the runner's start (it loads it while createXML runs, LATE_MODULES).
        handler = Background(journal_handler)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qemu-unit: %(message)s"))
    handler.addFilter(FIELDS)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def trace(phase: str) -> None:
    """A debug line `trace PHASE T`, T being CLOCK_MONOTONIC: one clock for every process
    of the host (the journal's __MONOTONIC_TIMESTAMP too), so bench/runner.py lines up
    the runner's phases with its own spawn and systemd's messages (README, Benchmarks)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("trace %s %.6f", phase, time.monotonic(), extra={"QEMU_UNIT_TRACE": phase})


def set_vm_fields(name: str, uuid: str | None = None) -> None:
    FIELDS.fields["QEMU_UNIT_VM"] = name
    if uuid:
        FIELDS.fields["QEMU_UNIT_UUID"] = uuid


def console_sink(name: str) -> Callable[[str], None]:
    """A function that records one line of the guest's console."""
    if journal_connected():
        journal = JournalSocket()

        def to_journal(line: str) -> None:
            journal.send(line, PRIORITY="6", SYSLOG_IDENTIFIER=CONSOLE_IDENTIFIER,
                         **FIELDS.fields)

        return to_journal

    def to_stderr(line: str) -> None:
        print(f"{name} console: {line}", file=sys.stderr, flush=True)

    return to_stderr
