"""console.py with real UNIX sockets: lines, the file copy, the rate limit, attached clients.

No sleeps: tests wait for what the console says (its log messages, the lines its
watchers see) or for a socket.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qemu_unit import log
from qemu_unit.vm.console import (
    LINE_OVERHEAD,
    MAX_LINE,
    MAX_PENDING_BYTES,
    Console,
    LineSplitter,
    Policy,
    decode,
)

# Besides the queue, the reader holds one read (64 KiB) and a partial line at a time.
READER_BUFFERS = 256 * 1024
DROPPED = re.compile(r"(\d+) console lines were not sent to the journal "
                     r"\((\d+) while the journal did not keep up\)")


def test_lines_split_across_chunks_and_crlf_stripped() -> None:
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\r\nwor") == [b"hello"]
    assert s.feed(b"ld\n\n") == [b"world", b""]
    assert s.flush() == []


def test_partial_last_line_is_flushed_and_bad_utf8_replaced() -> None:
    s = LineSplitter()
    assert s.feed(b"caf\xc3") == []
    assert s.feed(b"\xa9 \xff") == []
    assert [decode(line) for line in s.flush()] == ["café \ufffd"]


def test_endless_line_is_cut_not_buffered_forever() -> None:
    s = LineSplitter()
    out = s.feed(b"x" * (MAX_LINE * 2 + 5))
    assert out == [b"x" * MAX_LINE, b"x" * MAX_LINE]
    assert s.flush() == [b"xxxxx"]


def test_console_reads_every_line_from_the_connecting_peer(tmp_path: Path) -> None:
    got: list[str] = []
    watched: list[str] = []
    console = Console(tmp_path / "c.sock", got.append)
    console.watchers.append(watched.append)
    console.listen()
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(str(tmp_path / "c.sock"))
    lines = [f"line {i}" for i in range(2000)]
    sender = threading.Thread(target=lambda: peer.sendall("\n".join(lines).encode()))
    sender.start()
    sender.join()
    peer.close()
    assert console.closed.wait(5)
    console.close()
    assert got == lines  # none lost, none duplicated, the unterminated last one included
    assert watched == lines
    assert not (tmp_path / "c.sock").exists()


def test_close_without_peer_does_not_hang(tmp_path: Path) -> None:
    console = Console(tmp_path / "c.sock", lambda _line: None, attach_path=tmp_path / "a.sock")
    console.listen()
    console.close(drain_timeout=60)
    assert console.closed.is_set()
    # Woken by close(), not by the end of the join's timeout (which returns with them alive).
    assert not [t.name for t in threading.enumerate() if t.name.startswith("console")]


def test_close_wakes_the_attach_thread(tmp_path: Path) -> None:
    """A closed listening socket wakes no selector: without close()'s pipe the attach thread
    stayed in select() and every stop of a VM waited out the join's timeout (a second)."""
    console = Console(tmp_path / "c.sock", lambda _line: None, attach_path=tmp_path / "a.sock")
    console.listen()
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(str(tmp_path / "c.sock"))
    peer.close()  # QEMU exited
    assert console.closed.wait(30)
    console.close(drain_timeout=60)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("console")]



def test_attach_thread_that_starts_after_close_returns(tmp_path: Path) -> None:
    """A runner stopped right after the start: close() may close the attach socket before
    the attach thread registers it; the thread then returns instead of raising
    ValueError (a file descriptor of -1) into the journal."""
    console = Console(tmp_path / "c.sock", lambda _line: None, attach_path=tmp_path / "a.sock")
    console.listen()
    console.close(drain_timeout=60)
    console._serve_clients()  # what the thread runs, run once more after close()


# -- the file copy, the rate limit, a stalled journal, attached clients ------------------------


def _qemu(path: Path) -> socket.socket:
    """The peer QEMU would be: connects to the runner's console socket."""
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(str(path))
    return peer


def _run_console(tmp_path: Path, policy: Policy, sink: Callable[[str], None],
                 lines: list[str]) -> tuple[Console, list[str]]:
    notes: list[str] = []
    console = Console(tmp_path / "c.sock", sink, policy)
    with _captured(notes):
        console.listen(header="-- header --\n")
        peer = _qemu(tmp_path / "c.sock")
        peer.sendall("".join(f"{line}\r\n" for line in lines).encode())
        peer.close()
        assert console.closed.wait(10)
        console.close(send_timeout=30)
    return console, notes


class _Capture(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        with _NOTED:
            self.out.append(record.getMessage())
            _NOTED.notify_all()


# Notified at every captured message: a test waits for the runner's own words.
_NOTED = threading.Condition()


def _wait_for_notes(out: list[str], text: str, count: int = 1) -> None:
    """Until COUNT captured messages contain TEXT (the console logs after it acted)."""
    with _NOTED:
        assert _NOTED.wait_for(lambda: sum(text in n for n in out) >= count, timeout=30), out


@contextlib.contextmanager
def _captured(out: list[str]) -> Iterator[None]:
    handler = _Capture(out)
    level = log.log.level
    log.log.addHandler(handler)
    log.log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.log.removeHandler(handler)
        log.log.setLevel(level)


def test_rate_limit_drops_are_counted_and_the_file_has_everything(tmp_path: Path) -> None:
    got: list[str] = []
    lines = [f"line {i}" for i in range(5000)]
    policy = Policy(log_path=tmp_path / "logs" / "console.log", log_size=1024**2,
                    rate_interval=3600, rate_burst=1000)
    console, notes = _run_console(tmp_path, policy, got.append, lines)
    assert got == lines[:1000]
    assert console.dropped == 4000
    [report] = [n for n in notes if "not sent to the journal" in n]
    assert report.startswith("4000 console lines were not sent to the journal (4000 over the "
                             "rate limit of 1000 lines per 3600s)")
    assert f"the complete console is in {tmp_path}/logs/console.log" in report
    text = (tmp_path / "logs" / "console.log").read_bytes().decode()
    assert text == "-- header --\n" + "".join(f"{line}\r\n" for line in lines)


def test_console_log_rotates_and_stays_bounded(tmp_path: Path) -> None:
    log_path = tmp_path / "console.log"
    lines = [f"{i:07d}" + "x" * 92 for i in range(30000)]  # 3 MB
    policy = Policy(log_path=log_path, log_size=1024**2)
    _run_console(tmp_path, policy, lambda _line: None, lines)
    old, new = Path(f"{log_path}.1").read_bytes(), log_path.read_bytes()
    assert len(old) <= 1024**2 + 65536 and len(new) <= 1024**2 + 65536
    # Together the newest lines, in order, none missing.
    tail = (old + new).decode().split("\r\n")[:-1]
    numbers = [int(line[:7]) for line in tail if line[:7].isdigit()]
    assert numbers == list(range(numbers[0], 30000))


class _Gate:
    """A journal that takes one line whenever the test lets it (and says when it waits)."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.waiting = threading.Semaphore(0)  # released each time a line comes in
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()

    def sink(self, line: str) -> None:
        self.waiting.release()
        if not self._open.is_set():
            self._permits.acquire()
        self.got.append(line)

    def let_one_through(self) -> None:
        self._permits.release()

    def open(self) -> None:
        self._open.set()
        self._permits.release()  # the one line it may be waiting on


class _Seen:
    """A console watcher: counts the lines the reader has handled (queued or dropped)."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()

    def __call__(self, _line: str) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= count, timeout), self.count


@pytest.mark.parametrize("line", [b"", b"ab", b"y" * 16000], ids=["empty", "two", "long"])
def test_a_stalled_journal_holds_no_more_than_the_cap(tmp_path: Path, line: bytes) -> None:
    """The queue toward the journal is capped in memory (a line costs its bytes plus
    LINE_OVERHEAD), the sender's batch included, whatever the guest prints; the rest is
    counted, console.log has all of it, and the reader never waits for the journal."""
    cost = len(line) + LINE_OVERHEAD
    fits = MAX_PENDING_BYTES // cost
    first, second = fits + 500, fits
    journal, seen = _Gate(), _Seen()
    console = Console(tmp_path / "c.sock", journal.sink,
                      Policy(log_path=tmp_path / "console.log", log_size=1024**3))
    console.watchers.append(seen)
    notes: list[str] = []
    with _captured(notes):
        console.listen()
        peer = _qemu(tmp_path / "c.sock")
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            # The journal takes nothing: the reader reads all of it anyway.
            peer.sendall((line + b"\r\n") * first)
            seen.wait(first)
            held_first = tracemalloc.get_traced_memory()[0] - baseline
            assert console.held == fits * cost <= MAX_PENDING_BYTES
            assert console.dropped == first - fits
            # One line goes out and the sender waits in the next one: whatever batch it
            # took, exactly one line's room is free again.
            assert journal.waiting.acquire(timeout=10)
            journal.let_one_through()
            assert journal.waiting.acquire(timeout=10)
            peer.sendall((line + b"\r\n") * second)
            seen.wait(first + second)
            held_second = tracemalloc.get_traced_memory()[0] - baseline
            assert console.held == fits * cost
            assert console.dropped == first - fits + second - 1
            # Measured, not only counted: what Python holds (the lines, the queue), plus
            # the reader's own buffers (a read, a partial line).
            assert max(held_first, held_second) <= MAX_PENDING_BYTES + READER_BUFFERS, (
                held_first, held_second)
        finally:
            tracemalloc.stop()
            journal.open()
            peer.close()
        assert console.closed.wait(10)
        console.close(send_timeout=30)
    sent = fits + 1
    assert journal.got == [decode(line)] * sent and console.sent == sent
    assert console.dropped + sent == first + second
    assert console.held == 0
    # Said in runner messages (one every 10 s at most, the last at exit): all of them.
    reports = [m for m in map(DROPPED.match, notes) if m]
    assert sum(int(m.group(1)) for m in reports) == console.dropped
    assert all(m.group(1) == m.group(2) for m in reports), notes  # all for the journal
    # console.log has every line, the journal or not.
    assert (tmp_path / "console.log").read_bytes() == (line + b"\r\n") * (first + second)


def test_a_stalled_journal_keeps_order_and_counts(tmp_path: Path) -> None:
    journal = _Gate()
    lines = [f"{i:06d}" + "y" * 200 for i in range(60000)]  # 12 MB, more than the queue holds
    policy = Policy(log_path=tmp_path / "console.log", log_size=64 * 1024**2)
    console = Console(tmp_path / "c.sock", journal.sink, policy)
    console.listen()
    peer = _qemu(tmp_path / "c.sock")
    peer.sendall("".join(f"{line}\n" for line in lines).encode())  # returns: nobody blocks
    peer.close()
    assert console.closed.wait(10)
    journal.open()
    console.close(send_timeout=30)
    assert (tmp_path / "console.log").read_text().splitlines() == lines
    fits = MAX_PENDING_BYTES // (206 + LINE_OVERHEAD)
    assert journal.got == lines[:fits]  # the first ones, in order
    assert console.dropped == len(lines) - fits


def _attach(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    return client


def _recv_until(sock: socket.socket, text: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while text not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_attached_clients_see_output_and_type_to_the_guest_only(tmp_path: Path) -> None:
    got: list[str] = []
    console = Console(tmp_path / "c.sock", got.append, attach_path=tmp_path / "a.sock")
    console.listen()
    qemu = _qemu(tmp_path / "c.sock")
    notes: list[str] = []
    with _captured(notes):
        one, two = _attach(tmp_path / "a.sock"), _attach(tmp_path / "a.sock")
        # Both accepted before the guest prints (noted once each is a client).
        _wait_for_notes(notes, "Console client attached", 2)
        qemu.sendall(b"login: ")
        assert _recv_until(one, b"login: ") == b"login: "
        assert _recv_until(two, b"login: ") == b"login: "
        one.sendall(b"root\r")
        qemu.settimeout(10)
        assert qemu.recv(100) == b"root\r"  # to the guest...
        qemu.sendall(b"root\r\n# ")
        assert _recv_until(one, b"# ").endswith(b"root\r\n# ")
        one.close()
        qemu.sendall(b"more\n")
        assert _recv_until(two, b"more\n").endswith(b"more\n")
        qemu.close()
        assert console.closed.wait(10)
        console.close()
    assert got == ["login: root", "# more"]  # ...and the journal has what the guest printed
    assert sum("Console client attached" in n for n in notes) == 2
    assert sum("Console client detached" in n for n in notes) == 1  # two: closed at the end
    assert not (tmp_path / "a.sock").exists()


def test_a_client_that_stops_reading_is_cut_off_not_waited_for(tmp_path: Path) -> None:
    got: list[str] = []
    console = Console(tmp_path / "c.sock", got.append, attach_path=tmp_path / "a.sock")
    console.listen()
    qemu = _qemu(tmp_path / "c.sock")
    lines = [f"flood {i}" for i in range(200000)]
    notes: list[str] = []
    with _captured(notes):
        stuck = _attach(tmp_path / "a.sock")
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _wait_for_notes(notes, "Console client attached")
        qemu.settimeout(20)
        qemu.sendall("".join(f"{line}\n" for line in lines).encode())
        qemu.close()
        assert console.closed.wait(20)
        console.close(send_timeout=60)
    assert got == lines
    assert any("Disconnected console client" in n and "did not keep up" in n for n in notes)
    stuck.close()


def test_refused_client_gets_a_clear_line_and_nothing_else(tmp_path: Path) -> None:
    console = Console(tmp_path / "c.sock", lambda _line: None, attach_path=tmp_path / "a.sock")
    console.allowed_uids = set()
    console.listen()
    qemu = _qemu(tmp_path / "c.sock")
    notes: list[str] = []
    with _captured(notes):
        client = _attach(tmp_path / "a.sock")
        assert b"refused" in _recv_until(client, b"\n")
        assert client.recv(100) == b""
        qemu.close()
        assert console.closed.wait(10)
        console.close()
    assert any("Refused a console client" in n for n in notes)
