"""The runner's control socket: how `qemu-unit` verbs reach a running VM.

The runner owns the embed root and the only libvirt connection to it, so a verb
that needs the domain (exec and cp through the guest agent, save, snapshot)
asks the runner on `ROOT/control.sock`. The socket lives in the VM's runtime
directory (0700) and the peer is checked with SO_PEERCRED as for the console:
root and the runner's own uid, nobody else.

Protocol (JSON lines, UTF-8, each line at most MAX_LINE bytes):
- the client sends one request `{"op": NAME, ...}`; an op may then read further
  lines from the client (`Connection.receive()`: data for cp, stdin for exec);
- the runner answers with any number of intermediate lines (`Connection.send()`,
  never carrying "ok": output as it comes, progress) and ends with exactly one
  final line: `{"ok": true, ...}` or `{"ok": false, "error": "one line",
  "code": "CODE"}`; then it closes the connection.

Ops are handlers registered by name (`@handler("exec")`) in the modules that own
them (OWNERS): the dispatcher imports a module at the first request for one of its ops. A handler
gets the runner's `Context`, the request and the connection; it returns the
final line's fields or raises `ControlError`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu_unit import log
from qemu_unit.records import NamedTuple
from qemu_unit.vm.console import peer_credentials
from qemu_unit.vm.events import Event

logger = log.log

# One JSON line, either way. Big enough for a 1 MiB chunk in base64 with its envelope.
MAX_LINE = 2 * 1024 * 1024
# Connections served at once (a thread each); more wait in the listen backlog.
MAX_CLIENTS = 8
# A client that sends nothing for this long is dropped (reads of its request and data).
CLIENT_TIMEOUT = 60.0
# How long a refused client may take to finish sending before its socket is closed.
REFUSE_DRAIN_SECONDS = 1.0


class ControlError(Exception):
    """A request that failed; CODE lets the client pick its exit status."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Context(NamedTuple):
    """What handlers may use of the runner: the VM's name, its config, the domain
    (None before it starts and after it stops) and the runner's event queue."""

    name: str
    vm: Any = None
    domain: Callable[[], Any] = lambda: None
    post: Callable[[Event], None] = lambda _event: None


Handler = Callable[[Context, dict[str, Any], "Connection"], "dict[str, Any] | None"]
HANDLERS: dict[str, Handler] = {}
# The module that registers each op (@handler), imported at the op's first request: a VM
# nobody asks never loads them (~15 ms of CPU and ~1 MB per runner; they also pulled in
# dataclasses). tests/test_control.py checks the table against what the modules register.
OWNERS = {
    **dict.fromkeys(("exec", "stat", "pull", "push", "list", "mkdir"), "qemu_unit.vm.guest"),
    **dict.fromkeys(("backup", "checkpoint-delete"), "qemu_unit.vm.backup"),
    **dict.fromkeys(("snapshot-create", "snapshot-delete"), "qemu_unit.vm.snapshot"),
    "save": "qemu_unit.vm.saved",
}


def handler(op: str) -> Callable[[Handler], Handler]:
    """Register FUNCTION as the handler of requests {"op": OP}."""

    def register(function: Handler) -> Handler:
        if op in HANDLERS and HANDLERS[op] is not function:
            raise ValueError(f"control op {op!r} registered twice")
        HANDLERS[op] = function
        return function

    return register


class Connection:
    """One client: bounded JSON lines in, JSON lines out."""

    def __init__(self, sock: socket.socket, pid: int = 0, uid: int = 0) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self._buf = b""
        self._eof = False

    def receive(self, timeout: float | None = CLIENT_TIMEOUT) -> dict[str, Any] | None:
        """The next JSON object from the client; None at its end. Lines over MAX_LINE,
        non-objects and silence beyond TIMEOUT raise ControlError."""
        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            if self._eof:
                if self._buf:
                    raise ControlError("the request ends in the middle of a line", "protocol")
                return None
            if len(self._buf) > MAX_LINE:
                raise ControlError(f"a request line is longer than {MAX_LINE} bytes", "protocol")
            try:
                data = self.sock.recv(min(65536, MAX_LINE + 1 - len(self._buf)) or 1)
            except TimeoutError:
                raise ControlError(f"the client sent nothing for {timeout:g}s",
                                   "protocol") from None
            if not data:
                self._eof = True
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        if len(line) > MAX_LINE:
            raise ControlError(f"a request line is longer than {MAX_LINE} bytes", "protocol")
        import json  # not before createXML: the runner loads it then (LATE_MODULES)

        try:
            value = json.loads(line)
        except ValueError:
            raise ControlError("a request line is not JSON", "protocol") from None
        if not isinstance(value, dict):
            raise ControlError("a request line is not a JSON object", "protocol")
        return value

    def client_gone(self) -> bool:
        """True once the client has hung up (it never writes while waiting for output)."""
        if self._eof:
            return True
        # Non-blocking for real: with a timeout set, Python waits for data despite DONTWAIT.
        self.sock.settimeout(0)
        try:
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data

    def send(self, message: dict[str, Any]) -> None:
        """An intermediate line. OSError when the client is gone (the handler stops)."""
        if "ok" in message:
            raise ValueError("intermediate lines never carry 'ok'")
        self._write(message)

    def _write(self, message: dict[str, Any]) -> None:
        self.sock.settimeout(CLIENT_TIMEOUT)
        import json

        self.sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def find_handler(op: object) -> Handler | None:
    """The handler of OP, its module imported if need be (OWNERS); None: no such op."""
    if not isinstance(op, str):
        return None
    if op not in HANDLERS and op in OWNERS:
        importlib.import_module(OWNERS[op])  # the import lock serves concurrent requests
    return HANDLERS.get(op)


def serve_one(context: Context, conn: Connection) -> None:
    """Read one request, run its handler, write the final line."""
    final: dict[str, Any]
    try:
        request = conn.receive()
        if request is None:
            return
        op = request.get("op")
        function = find_handler(op)
        if function is None:
            raise ControlError(f"unknown op {op!r}", "unknown-op")
        final = {"ok": True, **(function(context, request, conn) or {})}
    except ControlError as e:
        final = {"ok": False, "error": e.message, "code": e.code}
    except OSError:
        return  # the client went away: nobody to answer
    except Exception as e:  # a bug in a handler must not take the runner down
        logger.exception("Control request failed")
        final = {"ok": False, "error": f"internal error: {e}", "code": "internal"}
    with contextlib.suppress(OSError):
        conn._write(final)


class Server:
    """Accepts clients on PATH from a thread of its own; one thread per client."""

    def __init__(self, path: Path, context: Context) -> None:
        self.path = path
        self.context = context
        self.allowed_uids = {0, os.getuid()}
        self._listener: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        self._listener = sock
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._clients:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            self._slots.acquire()
            try:
                sock, _ = listener.accept()
            except OSError:
                self._slots.release()
                return  # closed: the runner is stopping
            pid, uid, _gid = peer_credentials(sock)
            allowed = uid in self.allowed_uids
            if not allowed:
                logger.warning("Refused a control client (pid %d, uid %d): only root and "
                               "uid %d may control this VM", pid, uid, os.getuid())
            with self._lock:
                self._clients.add(sock)
            threading.Thread(target=self._serve if allowed else self._refuse,
                             args=(sock, pid, uid), name="control-client", daemon=True).start()

    def _refuse(self, sock: socket.socket, pid: int, uid: int) -> None:
        """Say no, then read what the client sent before closing: closing a UNIX socket
        with unread data resets the peer (ECONNRESET), which would hide the answer."""
        try:
            with contextlib.suppress(OSError):
                Connection(sock)._write({"ok": False, "code": "denied", "error":
                                         "only root and the VM's user may control it"})
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(REFUSE_DRAIN_SECONDS)
                for _ in range(MAX_LINE // 65536 + 1):  # bounded: never more than a request
                    if not sock.recv(65536):
                        break
        finally:
            with self._lock:
                self._clients.discard(sock)
            sock.close()
            self._slots.release()

    def _serve(self, sock: socket.socket, pid: int, uid: int) -> None:
        try:
            serve_one(self.context, Connection(sock, pid, uid))
        finally:
            with self._lock:
                self._clients.discard(sock)
            sock.close()
            self._slots.release()


@handler("ping")
def _ping(context: Context, _request: dict[str, Any], _conn: Connection) -> dict[str, Any]:
    """Is the runner there, and does its VM run: the cheapest question."""
    return {"name": context.name, "pid": os.getpid(), "running": context.domain() is not None}
