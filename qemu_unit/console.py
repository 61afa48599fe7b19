"""The guest's serial console, forwarded line by line.

The runner listens on a UNIX socket and the domain's serial port connects to it
(`<serial type='unix'><source mode='connect'>`). QEMU connects while it starts,
before any guest CPU runs, so no line is lost; a blocking reader thread means no
polling.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

# A guest that never prints a newline still gets its output recorded.
MAX_LINE = 16 * 1024


class LineSplitter:
    """Bytes in, complete text lines out; a trailing partial line is kept."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        while len(self._buf) >= MAX_LINE:
            lines.append(self._buf[:MAX_LINE])
            self._buf = self._buf[MAX_LINE:]
        return [_decode(line) for line in lines]

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, b""
        return [_decode(rest)] if rest else []


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


class Console:
    """Owns the listening socket and the reader thread."""

    def __init__(self, path: Path, sink: Callable[[str], None]) -> None:
        self.path = path
        self.sink = sink
        self.watchers: list[Callable[[str], None]] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conn: socket.socket | None = None
        self.closed = threading.Event()

    def listen(self) -> None:
        if self.path.is_socket() or self.path.exists():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(os.fspath(self.path))
        listener.listen(1)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="console", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            self.closed.set()
            return
        self._conn = conn
        splitter = LineSplitter()
        try:
            while data := conn.recv(65536):
                for line in splitter.feed(data):
                    self._emit(line)
        except OSError:
            pass
        for line in splitter.flush():
            self._emit(line)
        self.closed.set()

    def _emit(self, line: str) -> None:
        self.sink(line)
        for watch in self.watchers:
            watch(line)

    def close(self, drain_timeout: float = 1.0) -> None:
        """Stop listening; let the reader drain what QEMU wrote before it exited."""
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._thread is not None:
            self._thread.join(drain_timeout)
        if self._conn is not None and self._thread is not None and self._thread.is_alive():
            self._conn.shutdown(socket.SHUT_RDWR)
            self._thread.join(drain_timeout)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
