"""attach.py, the `qemu-unit console` client, on a real pseudo-terminal against a fake runner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Client:
    """`attach.attach(NAME)` in a child process whose terminal is a pty we hold."""

    def __init__(self, runtime: Path, *args: str) -> None:
        self.master, self.slave = os.openpty()
        self.saved = termios.tcgetattr(self.slave)
        call = f"attach.attach('t1'{''.join(args)})"
        code = f"import sys; from qemu_unit.cli import attach; sys.exit({call})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=self.slave, stdout=self.slave,
            stderr=self.slave, cwd=REPO, start_new_session=True,
            env={**os.environ, "RUNTIME_DIRECTORY": str(runtime), "PYTHONPATH": str(REPO)},
        )
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"{text!r} not in {self.seen!r}"
            self.seen += os.read(self.master, 4096)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[socket.socket]:
    """The runner's end: a listening attach socket."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "console-attach.sock"))
    listener.listen(1)
    listener.settimeout(20)
    yield listener
    listener.close()


def test_raw_while_attached_restored_after_ctrl_bracket(tmp_path: Path,
                                                        runner: socket.socket) -> None:
    client = Client(tmp_path)
    try:
        conn, _ = runner.accept()
        client.expect(b"detach with Ctrl-]")
        conn.sendall(b"login: ")
        client.expect(b"login: ")
        assert not termios.tcgetattr(client.slave)[3] & termios.ICANON  # raw
        os.write(client.master, b"root\r\x1d")
        conn.settimeout(10)
        assert conn.recv(100) == b"root\r"  # Ctrl-] itself never reaches the guest
        assert client.proc.wait(20) == 0
        client.expect(b"detached from the console of t1")
        assert termios.tcgetattr(client.slave) == client.saved
        conn.close()
    finally:
        client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminal_restored_when_killed_by_a_signal(tmp_path: Path, runner: socket.socket,
                                                   sig: signal.Signals) -> None:
    client = Client(tmp_path, ", read_only=True")
    try:
        conn, _ = runner.accept()
        client.expect(b"(read-only); detach with Ctrl-]")
        assert not termios.tcgetattr(client.slave)[3] & termios.ICANON
        os.write(client.master, b"ignored\r")
        client.proc.send_signal(sig)
        assert client.proc.wait(20) == 128 + sig
        assert termios.tcgetattr(client.slave) == client.saved
        conn.settimeout(2)
        assert conn.recv(100) == b""  # a read-only client typed nothing
        conn.close()
    finally:
        client.close()


def test_runner_gone_is_said_and_status_1(tmp_path: Path, runner: socket.socket) -> None:
    client = Client(tmp_path)
    try:
        conn, _ = runner.accept()
        client.expect(b"detach with Ctrl-]")
        conn.close()
        assert client.proc.wait(20) == 1
        client.expect(b"the console of t1 was closed")
        assert termios.tcgetattr(client.slave) == client.saved
    finally:
        client.close()
