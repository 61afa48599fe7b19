"""console.py: line splitting and the socket reader, with a real UNIX socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from qemu_unit.console import MAX_LINE, Console, LineSplitter


def test_lines_split_across_chunks_and_crlf_stripped() -> None:
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\r\nwor") == ["hello"]
    assert s.feed(b"ld\n\n") == ["world", ""]
    assert s.flush() == []


def test_partial_last_line_is_flushed_and_bad_utf8_replaced() -> None:
    s = LineSplitter()
    assert s.feed(b"caf\xc3") == []
    assert s.feed(b"\xa9 \xff") == []
    assert s.flush() == ["café \ufffd"]


def test_endless_line_is_cut_not_buffered_forever() -> None:
    s = LineSplitter()
    out = s.feed(b"x" * (MAX_LINE * 2 + 5))
    assert out == ["x" * MAX_LINE, "x" * MAX_LINE]
    assert s.flush() == ["xxxxx"]


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
    console = Console(tmp_path / "c.sock", lambda _line: None)
    console.listen()
    console.close(drain_timeout=2)
    assert console.closed.wait(2)
