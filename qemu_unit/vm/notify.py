"""sd_notify through the sdnotify package: the one path for the notify protocol.

(systemd-python writes the journal, see log.py; each dependency does one job.)
"""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    """Talks to the service manager when NOTIFY_SOCKET is set; a no-op otherwise."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_usec = _watchdog_usec()

    def send(self, *fields: str) -> None:
        if not self.enabled:
            return
        # A connection per message, as sd_notify(3) does: a manager that was away
        # gets the next one. debug=False: like sd_notify(3), a manager that is gone
        # or busy is no reason to fail; the message is dropped.
        sdnotify.SystemdNotifier().notify("\n".join(fields))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def _watchdog_usec() -> int | None:
    """WATCHDOG_USEC, if it is meant for this process (sd_watchdog_enabled semantics)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None
