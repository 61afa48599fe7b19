"""The client side of the runner's control socket (vm/control.py has the protocol).

`call(name, request)` connects to ROOT/control.sock of VM NAME (the system unit's,
else the caller's own runner's), sends the request, hands every intermediate line
to a callback and returns the final line's fields. Failures are `ControlFailed`,
one line each, whose exit status tells them apart (EXIT_*).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qemu_unit import paths
from qemu_unit.config.names import check_name
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm.control import MAX_LINE

# Exit statuses of verbs that go through the runner (sysexits.h where one fits).
# exec exits with the guest command's own status otherwise; these are the ones
# qemu-unit itself gives.
EXIT_NOT_RUNNING = 69  # EX_UNAVAILABLE: no runner, no control socket, the VM is not running
EXIT_AGENT_SILENT = 75  # EX_TEMPFAIL: the guest agent did not answer (yet)
EXIT_PROTOCOL = 76  # EX_PROTOCOL: the runner or the agent answered nonsense
EXIT_DENIED = 77  # EX_NOPERM: only root and the VM's user may control it
EXIT_NO_AGENT = 78  # EX_CONFIG: the VM has no guest agent channel
EXIT_TIMEOUT = 124  # exec --timeout ran out (as timeout(1))
EXIT_FAILED = 125  # anything else qemu-unit could not do (as podman exec)

CODE_EXIT = {
    "missing": 1,  # cp: no such path
    "usage": 64,  # EX_USAGE
    "not-running": EXIT_NOT_RUNNING,
    "agent-silent": EXIT_AGENT_SILENT,
    "protocol": EXIT_PROTOCOL,
    "denied": EXIT_DENIED,
    "no-agent": EXIT_NO_AGENT,
    "timeout": EXIT_TIMEOUT,
}


class ControlFailed(QemuUnitError):
    """A verb through the runner failed; exit_status says how."""

    def __init__(self, message: str, code: str = "failed", *,
                 path: str | os.PathLike[str] | None = None, socket: Path | None = None) -> None:
        super().__init__(message, path=path)
        self.code = code
        self.socket = socket  # the socket looked for, when finding it failed
        self.exit_status = CODE_EXIT.get(code, EXIT_FAILED)


def find_socket(name: str, which: str = "control_socket", user: bool = False) -> Path:
    """The socket WHICH (a host.Dirs property) of VM NAME: the system unit's runtime
    directory first, else the caller's own runner's (USER: only the caller's own, the
    runner of its qemu-run@NAME.service --user). Raises QemuUnitError when it is not
    there (code not-running) or may not be opened (denied)."""
    system: Path = getattr(paths.Dirs(state=paths.SYSTEM_STATE / name,
                                      root=paths.SYSTEM_RUNTIME / name,
                                      cache=paths.SYSTEM_CACHE, logs=paths.SYSTEM_LOGS / name),
                           which)
    try:
        own: Path | None = getattr(paths.finalize_dirs(name), which)
    except QemuUnitError:
        if user:
            raise
        own = None  # no private runtime directory, so no runner of the caller's own
    candidates = [p for p in ([own] if user else [system, own]) if p is not None]
    denied = None
    for path in candidates:
        try:
            path.stat()
        except PermissionError:
            denied = path
            continue
        except OSError:
            continue
        return path
    if denied is not None:
        raise ControlFailed(f"permission denied: only root and the VM's user "
                            f"({paths.SERVICE_USER}) may reach VM {name}", "denied",
                            path=denied.parent, socket=denied)
    raise ControlFailed(f"VM {name} is not running (no {candidates[0]})", "not-running",
                        socket=candidates[0])


class Session:
    """One request on one connection: send lines, read lines."""

    def __init__(self, name: str) -> None:
        self.name = check_name(name)
        path = find_socket(self.name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.sock.close()
            raise ControlFailed(f"VM {name} is not running (its runner does not listen on "
                                f"{path})", "not-running") from None
        except PermissionError:
            self.sock.close()
            raise ControlFailed(f"{path}: permission denied: only root and the VM's user "
                                f"({paths.SERVICE_USER}) may reach VM {name}", "denied") from None
        self._file = self.sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        except OSError as e:
            hung_up = ControlFailed(f"VM {self.name}: the runner hung up ({e.strerror or e})",
                                    "not-running")
        else:
            return
        # It may have answered (refused us, failed early) before reading all we sent.
        try:
            self.finish()
        except ControlFailed as answer:
            if answer.code != "not-running":
                raise answer from None
        raise hung_up

    def lines(self) -> Iterator[dict[str, Any]]:
        """Every line of the answer; the last one carries "ok"."""
        while True:
            try:
                line = self._file.readline(MAX_LINE + 1)
            except OSError as e:
                raise ControlFailed(f"VM {self.name}: the runner hung up ({e.strerror or e})",
                                    "not-running") from None
            if not line:
                raise ControlFailed(f"VM {self.name}: the runner hung up without an answer "
                                    "(the VM stopped?)", "not-running")
            if not line.endswith(b"\n"):
                raise ControlFailed(f"VM {self.name}: an answer line is too long", "protocol")
            try:
                value = json.loads(line)
            except ValueError:
                raise ControlFailed(f"VM {self.name}: the runner's answer is not JSON",
                                    "protocol") from None
            if not isinstance(value, dict):
                raise ControlFailed(f"VM {self.name}: the runner's answer is not an object",
                                    "protocol")
            yield value
            if "ok" in value:
                return

    def finish(self, on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Read the answer to its end: intermediate lines go to ON_LINE; the final line's
        fields are returned, or ControlFailed raised."""
        for value in self.lines():
            if "ok" not in value:
                if on_line is not None:
                    on_line(value)
                continue
            if value["ok"] is not True:
                raise ControlFailed(str(value.get("error") or "failed").splitlines()[0][:500],
                                    str(value.get("code") or "failed"))
            return value
        raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def session(name: str) -> Iterator[Session]:
    s = Session(name)
    try:
        yield s
    finally:
        s.close()


def call(name: str, request: dict[str, Any],
         on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send REQUEST to VM NAME's runner; the final answer's fields (see Session.finish)."""
    with session(name) as s:
        s.send(request)
        return s.finish(on_line)
