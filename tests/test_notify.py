"""notify.py: watchdog environment semantics (the protocol itself: tests/system)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import sdnotify

from qemu_unit.vm.notify import Notifier


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 2_000_000),
        ("2000000", "self", 2_000_000),
        ("2000000", "1", None),  # meant for another process
        ("0", None, None),
        ("junk", None, None),
        (None, None, None),
    ],
)
def test_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: int | None
) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(os.getpid()) if value == "self" else value)
    assert Notifier().watchdog_usec == expected


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")  # must not raise


def test_vanished_socket_is_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    n = Notifier()
    n.status("x")
    n.ready("y")  # still no exception: a later manager may come back


def test_messages_reach_the_socket_through_sdnotify(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(5)
    sent: list[str] = []
    real = sdnotify.SystemdNotifier.notify
    monkeypatch.setattr(sdnotify.SystemdNotifier, "notify",
                        lambda self, state: sent.append(state) or real(self, state))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    Notifier().ready("Running (TCG)")
    assert sock.recv(4096) == b"READY=1\nSTATUS=Running (TCG)"
    assert sent == ["READY=1\nSTATUS=Running (TCG)"]  # the one path: sdnotify
    sock.close()


def test_a_manager_that_comes_back_gets_the_next_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier()
    n.status("lost")  # nobody listens yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    n.status("found")
    assert sock.recv(4096) == b"STATUS=found"
    sock.close()
