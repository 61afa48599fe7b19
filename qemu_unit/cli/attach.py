"""`qemu-unit console NAME`: this terminal on a running VM's serial console.

The runner (console.py) accepts clients on ROOT/console-attach.sock: what the
guest prints arrives as raw bytes; what is written goes to the guest's input
and nowhere else. The socket lives in the VM's runtime directory (mode 0700,
owned by the VM's user) and the runner checks SO_PEERCRED as well: root and
the VM's user may attach, nobody else. A read-only client never writes. The
terminal is raw while attached (Ctrl-C goes to the guest) and restored on
every way out.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from qemu_unit.cli import control
from qemu_unit.config.names import check_name
from qemu_unit.errors import QemuUnitError

ESCAPE = b"\x1d"  # Ctrl-]


def find_socket(name: str, user: bool = False) -> Path:
    """The attach socket of VM NAME: the system unit's, else the caller's own runner's
    (USER: only the caller's own, the runner of its qemu-run@NAME.service --user)."""
    try:
        return control.find_socket(name, "attach_socket", user=user)
    except control.ControlFailed as e:
        if e.code == "denied":
            raise QemuUnitError(
                f"cannot attach to the console of {name}: permission denied: only root and the "
                f"VM's own user (qemu-vm-{name}) may attach", path=e.path,
            ) from None
        raise QemuUnitError(f"VM {name} is not running, or has no console (Console=none): "
                            f"no {e.socket}") from None


def _say(text: str) -> None:
    # \r: the terminal may be raw.
    sys.stderr.write(f"\r\n{text}\r\n" if text.startswith("qemu-unit:") else f"{text}\r\n")
    sys.stderr.flush()


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """FD in raw mode (if it is a terminal) until the block is left, however it is left."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _exit_on(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def attach(name: str, read_only: bool = False, stdin: int = 0, stdout: int = 1,
           user: bool = False) -> int:
    """Copy between the terminal and the console until Ctrl-] or the console closes."""
    check_name(name)
    path = find_socket(name, user)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(os.fspath(path))
    except PermissionError:
        raise QemuUnitError(f"cannot attach to the console of {name}: permission denied: "
                            f"only root and the VM's own user (qemu-vm-{name}) may attach",
                            path=path) from None
    except OSError as e:
        raise QemuUnitError(f"VM {name} is not running: {e.strerror}", path=path) from None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)
    mode = " (read-only)" if read_only else ""
    with sock, raw_terminal(stdin), selectors.DefaultSelector() as sel:
        _say(f"Connected to the console of {name}{mode}; detach with Ctrl-]")
        sel.register(sock, selectors.EVENT_READ)
        try:
            sel.register(stdin, selectors.EVENT_READ)
        except PermissionError:
            pass  # /dev/null or a file: epoll cannot wait for it, and there is nothing to type
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        _say(f"qemu-unit: the console of {name} was closed (the VM stopped, "
                             f"or the runner cut off this client for not keeping up)")
                        return 1
                    _write_all(stdout, data)
                    continue
                data = os.read(stdin, 4096)
                if not data:
                    sel.unregister(stdin)  # no more input; keep watching
                    continue
                data, escape, _ = data.partition(ESCAPE)
                if data and not read_only:
                    sock.sendall(data)
                if escape:
                    _say(f"qemu-unit: detached from the console of {name}")
                    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
