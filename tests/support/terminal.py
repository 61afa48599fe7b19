"""A terminal attached to a VM's console inside a test container (`qemu-unit console`)."""

from __future__ import annotations

import os
import subprocess
import termios
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.container import INSIDE_ENV, Container


class Attached:
    """`qemu-unit console VM ARGS` inside the container, on a pseudo-terminal of its own."""

    def __init__(self, ct: Container, qemu_unit_bin: Path, vm: str, *args: str,
                 prefix: Sequence[str] = (), options: Sequence[str] = ()) -> None:
        """PREFIX runs the command (e.g. as another user); OPTIONS go before `console`."""
        self.master, self.slave = os.openpty()
        self.saved = termios.tcgetattr(self.slave)
        self.output = b""
        self._cond = threading.Condition()
        env = [f"{k}={v}" for k, v in INSIDE_ENV.items()] + ["TERM=dumb"]
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(ct.leader), "-a", "env", "-i", *env,
             *prefix, str(qemu_unit_bin), *options, "console", vm, *args],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._cond.notify_all()
                    return
                self.output += data
                self._cond.notify_all()

    def expect(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while text.encode() not in self.output:
                left = deadline - time.monotonic()
                if left <= 0:
                    shows = self.output[-2000:].decode(errors="replace")
                    raise AssertionError(f"{text!r} not on the terminal after {timeout} s; "
                                         f"it shows:\n{shows}")
                self._cond.wait(left)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def detach(self) -> int:
        self.type(b"\x1d")
        status = self.proc.wait(30)
        self.expect("detached from the console")
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.slave)
        os.close(self.master)
        self._reader.join(5)
