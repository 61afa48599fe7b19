"""The guest's serial console: read at once, kept in a file, sent to the journal, shared.

The runner listens on a UNIX socket and the domain's serial port connects to it
(`<serial type='unix'><source mode='connect'>`). QEMU connects while it starts,
before any guest CPU runs. QEMU's 16550 emulation drops bytes when its chardev
is not writable (hw/char/serial.c retries a few times, then gives up), so
whoever reads that socket must never wait for anything slow. Three threads,
each blocked without a timeout while the guest is quiet (no idle wake-ups):

- the reader reads QEMU's socket, appends the bytes to the console log file
  (page-cache writes), queues complete lines for the sender (bounded in memory,
  whatever the guest prints; counted when full or over the rate limit) and copies
  the bytes to attached clients without blocking (a client that cannot take them
  is disconnected);
- the sender writes queued lines to the journal (or stderr) and says, in one
  line, how many it could not send and where the complete copy is. It may wait
  for journald as long as journald likes (log.JournalSocket waits without
  holding the GIL): meanwhile the queue fills up and the reader counts what no
  longer fits;
- the attach thread accepts `qemu-unit console` clients (root and the runner's
  own user only, by SO_PEERCRED) and passes their keystrokes to the guest.
  Clients only ever reach the guest's input: the journal gets what the guest prints.

Closing a listening socket wakes neither accept() nor a selector waiting on it (measured:
the join waited its whole timeout, a second on every stop), so the reader (until QEMU
connects) and the attach thread also wait on a pipe that close() writes to.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qemu_unit import log, paths
from qemu_unit.config.settings import VMConfig
from qemu_unit.records import NamedTuple

logger = log.log

# A guest that never prints a newline still gets its output recorded.
MAX_LINE = 16 * 1024
# Memory held for lines waiting for the journal (queued or in the sender's hands):
# beyond this they are counted, not kept.
MAX_PENDING_BYTES = 8 * 1024**2
# What a queued line costs besides its bytes: the bytes object's header (33 bytes;
# b"" is shared) and the queue's pointer (8), with room for the allocator's rounding.
# Without it, 40 Mi empty lines would be "nothing" and hold 340 MiB.
LINE_OVERHEAD = 64
# Lines the sender takes from the queue at a time (they stay counted until sent).
BATCH_LINES = 256
# Runner messages from the console threads waiting for the sender; more are counted.
MAX_NOTES = 100
# How often at most a line reports console lines the journal did not get.
REPORT_EVERY = 10.0
# What QEMU may write before the reader comes back (the kernel caps it at rmem_max).
RCVBUF = 4 * 1024**2
# Room for an attached terminal that lags a little before it is cut off.
CLIENT_SNDBUF = 1024**2


class LineSplitter:
    """Bytes in, complete lines out (without CR LF, still bytes); a partial line is kept."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        while len(self._buf) >= MAX_LINE:
            lines.append(self._buf[:MAX_LINE])
            self._buf = self._buf[MAX_LINE:]
        return [line.rstrip(b"\r") for line in lines]

    def flush(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest.rstrip(b"\r")] if rest else []


def decode(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")


class Policy(NamedTuple):
    """What happens to console output besides the journal (ConsoleLog=, ConsoleRateLimit*=)."""

    log_path: Path | None = None  # None: no file copy
    log_size: int = 0  # bytes per file; the file is renamed to PATH.1 when full
    rate_interval: float = 0.0  # 0 or a burst of 0: no rate limit
    rate_burst: int = 0

    @classmethod
    def for_vm(cls, vm: VMConfig, logs: Path) -> Policy:
        return cls(
            log_path=logs / paths.CONSOLE_LOG if vm.console_log else None,
            log_size=vm.console_log,
            rate_interval=vm.console_rate_interval,
            rate_burst=vm.console_rate_burst,
        )


JOURNAL_ONLY = Policy()


class ConsoleLog:
    """A size-bounded copy of every byte: PATH, rotated once to PATH.1 (at most 2 x SIZE)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd = -1
        self._written = 0
        self.error: str | None = None

    def open(self, header: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        self._written = os.fstat(self._fd).st_size
        # The previous run's last line may lack its newline.
        self.write((("\n" if self._written else "") + header).encode())

    def write(self, data: bytes) -> str | None:
        """Append DATA; return a message when writing starts failing (once per failure)."""
        if self._fd < 0:
            return None
        try:
            if self._written and self._written + len(data) > self.size:
                os.replace(self.path, f"{self.path}.1")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
                os.close(self._fd)
                self._fd, self._written = fd, 0
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._written += n
        except OSError as e:
            failed = self.error is None
            self.error = e.strerror or str(e)
            return f"cannot write the console log {self.path}: {self.error}" if failed else None
        self.error = None
        return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Client(NamedTuple):
    sock: socket.socket
    pid: int
    uid: int


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    fmt = "3i"
    return struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              struct.calcsize(fmt)))


class Console:
    """Owns QEMU's console socket, the attach socket, the log file and the three threads."""

    def __init__(
        self,
        path: Path,
        sink: Callable[[str], None],
        policy: Policy = JOURNAL_ONLY,
        attach_path: Path | None = None,
    ) -> None:
        self.path = path
        self.sink = sink
        self.policy = policy
        self.attach_path = attach_path
        self.watchers: list[Callable[[str], None]] = []
        self.allowed_uids = {0, os.getuid()}
        self.closed = threading.Event()
        self.file = (
            ConsoleLog(policy.log_path, policy.log_size) if policy.log_path is not None else None
        )
        self._listener: socket.socket | None = None
        self._attach: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._conn: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        # Reader -> sender: lines, messages for the runner's log, counters.
        self._cond = threading.Condition()
        self._pending: collections.deque[bytes] = collections.deque()
        self._held = 0  # memory for lines not yet sent (queued and in the sender's batch)
        self._notes: list[tuple[int, str]] = []
        self._notes_dropped = 0
        self._eof = False
        self._dropped_rate = 0
        self._dropped_full = 0
        self._first_drop: float | None = None
        self._window_start = 0.0
        self._window_count = 0
        self.sent = 0
        self.dropped = 0  # every line the journal did not get, reported or not
        # Attached clients; the reader writes to them, the attach thread reads them.
        self._clients_lock = threading.Lock()
        self._clients: list[_Client] = []
        self._input_dropped = False

    # -- start and stop ---------------------------------------------------------------------

    def listen(self, header: str = "") -> None:
        if self.file is not None:
            try:
                self.file.open(header)
            except OSError as e:
                logger.warning("Cannot open the console log %s: %s; console lines go to the "
                               "journal only", self.file.path, e.strerror or e)
                self.file = None
        self._listener = self._bind(self.path, backlog=1)
        if self.attach_path is not None:
            self._attach = self._bind(self.attach_path, backlog=8)
        self._start(self._read, "console")
        self._start(self._send, "console-journal")
        if self._attach is not None:
            self._start(self._serve_clients, "console-attach")

    def _bind(self, path: Path, backlog: int) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(os.fspath(path))
        sock.listen(backlog)
        return sock

    def _start(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self, drain_timeout: float = 1.0, send_timeout: float = 10.0) -> None:
        """Stop listening; drain what QEMU wrote before it exited; flush the journal queue."""
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")  # the reader's accept and the attach thread return
        for sock in (self._listener, self._attach):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        reader, sender = self._threads[:2] if self._threads else (None, None)
        attach = self._threads[2:]
        if reader is not None:
            reader.join(drain_timeout)
            if reader.is_alive() and self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
                reader.join(drain_timeout)
        for thread in attach:
            thread.join(drain_timeout)
        with self._clients_lock:
            for client in self._clients:
                client.sock.close()
            self._clients.clear()
        if sender is not None:
            sender.join(send_timeout)
            if sender.is_alive():
                logger.warning("%d console lines were still waiting for the journal at exit",
                               len(self._pending))
        if self.file is not None:
            self.file.close()
        if self._wake_w >= 0 and not any(t.is_alive() for t in self._threads):
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        for path in (self.path, self.attach_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # -- the reader -------------------------------------------------------------------------

    def _woken(self, sock: socket.socket) -> bool:
        """Wait until SOCK is readable (True) or close() was called (False)."""
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            return all(key.fileobj is sock for key, _ in sel.select())

    def _read(self) -> None:
        assert self._listener is not None
        try:
            if not self._woken(self._listener):
                raise OSError("closed")
            conn, _ = self._listener.accept()
        except (OSError, ValueError):
            self._finish()
            return
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self._conn = conn
        splitter = LineSplitter()
        try:
            while data := conn.recv(65536):
                self._take(data, splitter.feed(data))
        except OSError:
            pass
        self._take(b"", splitter.flush())
        self._finish()

    def _take(self, data: bytes, lines: list[bytes]) -> None:
        if self.file is not None and data:
            problem = self.file.write(data)
            if problem:
                self._note(problem)
        if data and self._clients:
            self._to_clients(data)
        if lines:
            self._queue(lines)
            for watch in self.watchers:
                for line in lines:
                    watch(decode(line))

    @property
    def held(self) -> int:
        """Bytes held for lines the journal has not got yet, as counted against the cap."""
        return self._held

    def _queue(self, lines: list[bytes]) -> None:
        p = self.policy
        now = time.monotonic()
        with self._cond:
            for line in lines:
                if p.rate_interval > 0 and p.rate_burst > 0:
                    if now - self._window_start >= p.rate_interval:
                        self._window_start, self._window_count = now, 0
                    self._window_count += 1
                    if self._window_count > p.rate_burst:
                        self._dropped_rate += 1
                        self._drop(now)
                        continue
                cost = len(line) + LINE_OVERHEAD
                if self._held + cost > MAX_PENDING_BYTES:
                    self._dropped_full += 1
                    self._drop(now)
                    continue
                self._pending.append(line)
                self._held += cost
            self._cond.notify()

    def _drop(self, now: float) -> None:
        self.dropped += 1
        if self._first_drop is None:
            self._first_drop = now

    def _note(self, message: str, level: int = logging.WARNING) -> None:
        """A message for the runner's log, written by the sender (never blocks the reader)."""
        with self._cond:
            if len(self._notes) >= MAX_NOTES:
                self._notes_dropped += 1
                return
            self._notes.append((level, message))
            self._cond.notify()

    def _finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()
        self.closed.set()

    # -- the sender -------------------------------------------------------------------------

    def _send(self) -> None:
        while True:
            with self._cond:
                while True:
                    due = self._report_due()
                    if self._pending or self._notes or self._eof or due is not None and due <= 0:
                        break
                    self._cond.wait(due)
                # Bounded, and counted against the cap until sent: a journal that
                # blocks on the first line of a batch holds no more than the cap.
                pending = self._pending
                batch = [pending.popleft() for _ in range(min(len(pending), BATCH_LINES))]
                notes, self._notes = self._notes, []
                notes_dropped, self._notes_dropped = self._notes_dropped, 0
                eof = self._eof
            for line in batch:
                try:
                    self.sink(decode(line))
                except OSError:
                    with self._cond:
                        self._dropped_full += 1
                        self._drop(time.monotonic())
                else:
                    self.sent += 1
                with self._cond:
                    self._held -= len(line) + LINE_OVERHEAD
            for level, note in notes:
                logger.log(level, "%s", note)
            if notes_dropped:
                logger.warning("%d more console messages were left out", notes_dropped)
            report = None
            with self._cond:
                due = self._report_due()
                if due is not None and (due <= 0 or eof and not self._pending):
                    report = self._dropped_rate, self._dropped_full
                    self._dropped_rate = self._dropped_full = 0
                    self._first_drop = None
                done = eof and not self._pending and not self._notes
            if report:
                logger.warning("%s", self.drop_message(*report))
            if done:
                return

    def _report_due(self) -> float | None:
        """Seconds until unsent lines are to be reported (None: nothing to report)."""
        if self._first_drop is None:
            return None
        return self._first_drop + REPORT_EVERY - time.monotonic()

    def drop_message(self, over_rate: int, overflow: int) -> str:
        p = self.policy
        why = []
        if over_rate:
            why.append(f"{over_rate} over the rate limit of {p.rate_burst} lines per "
                       f"{p.rate_interval:g}s")
        if overflow:
            why.append(f"{overflow} while the journal did not keep up")
        where = (
            f"the complete console is in {self.file.path}"
            if self.file is not None and self.file.error is None
            else "they are lost (no console log file)"
        )
        return (f"{over_rate + overflow} console lines were not sent to the journal "
                f"({', '.join(why)}); {where}")

    # -- attached clients -------------------------------------------------------------------

    def _serve_clients(self) -> None:
        assert self._attach is not None
        with selectors.DefaultSelector() as sel:
            try:
                sel.register(self._attach, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
            except ValueError:
                return  # close() ran before this thread got here: nothing to serve
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return  # close(): the runner is stopping
                    if key.fileobj is self._attach:
                        if not self._accept(sel):
                            return
                    else:
                        self._client_input(sel, key.data)

    def _accept(self, sel: selectors.BaseSelector) -> bool:
        assert self._attach is not None
        try:
            sock, _ = self._attach.accept()
        except OSError:
            return False  # closed: the runner is stopping
        pid, uid, _gid = peer_credentials(sock)
        if uid not in self.allowed_uids:
            self._note(f"Refused a console client (pid {pid}, uid {uid}): only root and "
                       f"uid {os.getuid()} may attach")
            with contextlib.suppress(OSError):
                sock.sendall(b"qemu-unit: refused: only root and the VM's user may attach "
                             b"to its console\r\n")
            sock.close()
            return True
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
        client = _Client(sock, pid, uid)
        with self._clients_lock:
            self._clients.append(client)
        sel.register(sock, selectors.EVENT_READ, client)
        self._note(f"Console client attached (pid {pid}, uid {uid})", logging.INFO)
        return True

    def _client_input(self, sel: selectors.BaseSelector, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._to_guest(data)
            return
        # Detached, or cut off by the reader (which only shuts the socket down): the
        # selector is this thread's, so this thread closes.
        with self._clients_lock:
            sel.unregister(client.sock)
            client.sock.close()
            if client in self._clients:
                self._clients.remove(client)
                self._note(f"Console client detached (pid {client.pid}, uid {client.uid})",
                           logging.INFO)

    def _to_guest(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            sent = conn.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            return
        if sent < len(data) and not self._input_dropped:
            self._input_dropped = True
            self._note("The guest does not read its console input: keystrokes were dropped")

    def _to_clients(self, data: bytes) -> None:
        with self._clients_lock:
            for client in list(self._clients):
                try:
                    sent = client.sock.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._drop_client(client, None)
                    continue
                if sent < len(data):
                    self._drop_client(client, f"Disconnected console client (pid {client.pid}, "
                                              f"uid {client.uid}): it did not keep up with the "
                                              f"guest's output")

    def _drop_client(self, client: _Client, why: str | None) -> None:
        """Called with _clients_lock held; the attach thread closes on the EOF this causes."""
        self._clients.remove(client)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)
        self._note(why or f"Console client detached (pid {client.pid}, uid {client.uid})",
                   logging.WARNING if why else logging.INFO)
