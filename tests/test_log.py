"""log.py: journald's native protocol, and a journal that does not read never holds anyone up.

systemd-python's journal.send keeps the GIL while sendmsg() waits on a full journal
socket: with journald stopped, every thread of the runner froze (issue 15). These
tests use a real datagram socket that nobody reads, as a stopped journald is.
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from qemu_unit import log


def _journald(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def test_entries_are_journald_native_datagrams(tmp_path: Path) -> None:
    journald = _journald(tmp_path / "socket")
    journal = log.JournalSocket(str(tmp_path / "socket"))
    journal.send("hello", PRIORITY="6", SYSLOG_IDENTIFIER="qemu-unit-console",
                 QEMU_UNIT_VM="web", CODE_LINE=12, msg="not a field name", _PID="forged")
    journal.send("two\nlines", BINARY=b"\x00\xff")
    assert journald.recv(65536) == (b"MESSAGE=hello\nPRIORITY=6\n"
                                    b"SYSLOG_IDENTIFIER=qemu-unit-console\nQEMU_UNIT_VM=web\n"
                                    b"CODE_LINE=12\n")
    assert journald.recv(65536) == (b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"
                                    b"BINARY=\x00\xff\n")
    journal.close()
    journald.close()


def test_runner_records_reach_the_journal_with_their_fields(tmp_path: Path) -> None:
    """The handler setup() installs under systemd (Background aside), on a real socket."""
    journald = _journald(tmp_path / "socket")
    handler = log.journal_handler(str(tmp_path / "socket"))
    handler.addFilter(log.FIELDS)
    logger = logging.getLogger("qemu_unit.test_journal_handler")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    log.set_vm_fields("web", "0f1e")
    try:
        logger.warning("Started VM %s", "web")
    finally:
        logger.removeHandler(handler)
        log.FIELDS.fields.clear()
    fields = dict(line.split("=", 1) for line in journald.recv(65536).decode().splitlines())
    assert fields["MESSAGE"] == "Started VM web"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "qemu-unit"
    assert fields["QEMU_UNIT_VM"] == "web" and fields["QEMU_UNIT_UUID"] == "0f1e"
    journald.close()


def test_a_missing_journal_is_an_oserror(tmp_path: Path) -> None:
    journal = log.JournalSocket(str(tmp_path / "nothing"))
    try:
        journal.send("lost")
    except OSError:
        pass
    else:
        raise AssertionError("sending to no journal succeeded")
    journal.close()


# Run in a child: were the GIL held, the child would hang, and the timeout says so.
BLOCKED_SEND = textwrap.dedent("""
    import socket, sys, threading, time
    from qemu_unit import log
    path = sys.argv[1]
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(path)  # never read, as a stopped journald
    journal = log.JournalSocket(path)
    sent = 0
    def flood():
        global sent
        while True:
            journal.send("x" * 100)
            sent += 1
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    # This thread runs Python while the other one waits in sendto() on the full socket.
    syscall = f"/proc/self/task/{thread.native_id}/syscall"
    while open(syscall).read().split()[0] != "44":  # sendto
        time.sleep(0.01)
    before = sent
    for _ in range(100_000):
        pass
    print(f"blocked after {sent} entries; meanwhile this thread ran", flush=True)
    assert sent == before
""")


def test_a_journal_that_does_not_read_blocks_only_the_sending_thread(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKED_SEND, str(tmp_path / "socket")],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "meanwhile this thread ran" in proc.stdout


class _Stuck(logging.Handler):
    """A journal handler that takes one record, then waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[logging.LogRecord] = []
        self.entered = threading.Event()
        self.go = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        self.go.wait()
        self.got.append(record)


def test_runner_logging_never_waits_for_the_journal_and_counts_what_it_lost() -> None:
    stuck = _Stuck()
    background = log.Background(stuck, limit=50)
    logger = logging.getLogger("qemu_unit.test_background")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(background)
    try:
        logger.warning("first %s", "one")
        assert stuck.entered.wait(10)  # the journal thread holds it and waits
        for i in range(55):  # returns at once: 50 queued, 5 counted
            logger.info("record %d", i)
        assert background.dropped == 5
        stuck.go.set()
        assert background.wait_sent(timeout=10)
    finally:
        logger.removeHandler(background)
    messages = [r.getMessage() for r in stuck.got]
    assert messages == ["first one", "5 runner messages were lost: the journal did not take "
                        "them", *(f"record {i}" for i in range(50))]
    assert stuck.got[1].levelno == logging.WARNING


def test_a_background_handler_made_with_a_function_calls_it_at_the_first_record() -> None:
    """setup() under the journal: systemd.journal is imported by the journal thread at the
    first record, not before the runner's createXML."""
    made: list[str] = []
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    def make() -> logging.Handler:
        made.append(threading.current_thread().name)
        return Keep()

    background = log.Background(make)
    logger = logging.getLogger("qemu_unit.test_background_lazy")
    logger.propagate = False
    logger.addHandler(background)
    try:
        assert background.wait_sent(timeout=10) and made == []
        logger.warning("one")
        logger.warning("two")
        assert background.wait_sent(timeout=10)
    finally:
        logger.removeHandler(background)
    assert made == ["log-journal"]
    assert [r.getMessage() for r in got] == ["one", "two"]


def test_a_background_handler_that_cannot_be_made_logs_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A broken systemd-python: the records still reach stderr (the journal's stream under
    systemd) instead of dying with the journal thread."""

    def make() -> logging.Handler:
        raise ImportError("no module named systemd")

    background = log.Background(make)
    logger = logging.getLogger("qemu_unit.test_background_broken")
    logger.propagate = False
    logger.addHandler(background)
    try:
        logger.warning("still here")
        assert background.wait_sent(timeout=10)
    finally:
        logger.removeHandler(background)
    err = capsys.readouterr().err
    assert "no journal handler (ImportError: no module named systemd)" in err
    assert "still here" in err
