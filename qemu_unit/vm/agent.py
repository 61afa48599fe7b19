"""The QEMU guest agent, asked through libvirt (qemuAgentCommand), with bounds.

The guest controls every answer: a reply longer than MAX_REPLY, one that is not the
JSON the command promises, a base64 field that does not decode or decodes to more
than was asked for all end in one `ControlError` line, never in unbounded memory or
time. (libvirt itself reads the agent's whole reply line before we see it.)

`run()` runs a program in the guest and waits (bounded) for its exit and its
captured output: stat, chmod/mv for cp, kill for exec --timeout, health checks.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from qemu_unit.vm.control import ControlError

# Seconds libvirt waits for one agent answer.
COMMAND_TIMEOUT = 20
# The longest agent reply taken (JSON text); file reads ask for at most CHUNK bytes.
CHUNK = 1024 * 1024
MAX_REPLY = 2 * CHUNK
# Bytes per guest-file-write (and the most input-data given to guest-exec). With libvirt
# 9.0 and qemu-ga 7.2 (Debian 12) a request of 333 KB of JSON text (a 250,000-byte write)
# was never answered, idle or loaded, while 187 KB (140,000 bytes) took 0.2 s; the socket's
# send buffer (net.core.wmem_default, 212,992 bytes) lies between: a request that does not
# fit in one write() to the agent's socket stalls. Requests stay near 128 KiB.
WRITE_CHUNK = 96 * 1024
# Attempts of one positioned file read or write whose answer did not come in time.
ATTEMPTS = 3
# Output of a program run() keeps (qemu-ga itself captures at most 16 MiB per stream).
MAX_OUTPUT = 64 * 1024
# guest-exec-status polling: fast at first (short commands), then at this pace.
POLL_FIRST = 0.002
POLL_MAX = 0.1

NO_CHANNEL_HINT = ("the VM has no guest agent channel (ShutdownMode=agent, Ready=agent or "
                   "HealthCmd= adds one)")


def _libvirt_error(e: libvirt.libvirtError, what: str) -> ControlError:
    code = e.get_error_code()
    message = str(e.get_error_message() or e).splitlines()[0][:300]
    lowered = message.lower()
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED or "not configured" in lowered:
        return ControlError(NO_CHANNEL_HINT, "no-agent")
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                libvirt.VIR_ERR_OPERATION_TIMEOUT):
        return ControlError(f"the guest agent does not answer: {message}", "agent-silent")
    if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
        return ControlError(f"the VM is not running: {message}", "not-running")
    # The agent's own error ("Failed to open file ...: No such file or directory").
    for prefix in (f"unable to execute qemu agent command '{what}': ",
                   "internal error: unable to execute qemu agent command"):
        if lowered.startswith(prefix):
            message = message[len(prefix):].lstrip(": ")
    return ControlError(message, "agent-error")


class Agent:
    """One domain's guest agent."""

    def __init__(self, dom: Any, timeout: int = COMMAND_TIMEOUT) -> None:
        if dom is None:
            raise ControlError("the VM is not running (yet)", "not-running")
        self.dom = dom
        self.timeout = timeout

    def command(self, execute: str, arguments: dict[str, Any] | None = None,
                timeout: int | None = None) -> Any:
        """The "return" value of one agent command."""
        import libvirt_qemu

        request = {"execute": execute, **({"arguments": arguments} if arguments else {})}
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self.dom, json.dumps(request), timeout or self.timeout, 0
            )
        except libvirt.libvirtError as e:
            raise _libvirt_error(e, execute) from None
        return parse_reply(execute, reply)

    # -- files --------------------------------------------------------------------------

    def open(self, path: str, mode: str) -> int:
        return expect_int(self.command("guest-file-open", {"path": path, "mode": mode}),
                          "guest-file-open")

    def read(self, handle: int, count: int = CHUNK) -> tuple[bytes, bool]:
        """(data, eof) of one guest-file-read of at most COUNT bytes."""
        value = self.command("guest-file-read", {"handle": handle, "count": count})
        if not isinstance(value, dict):
            raise ControlError("guest-file-read: the agent's answer is malformed", "protocol")
        data = decode(value.get("buf-b64", ""), count, "guest-file-read")
        return data, bool(value.get("eof"))

    def write(self, handle: int, data: bytes) -> None:
        value = self.command("guest-file-write",
                             {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
        if not isinstance(value, dict) or value.get("count") != len(data):
            raise ControlError("guest-file-write: the guest wrote less than it was given",
                               "agent-error")

    def write_all(self, handle: int, offset: int, data: bytes) -> None:
        """DATA at OFFSET of an open file, in WRITE_CHUNK pieces."""
        for start in range(0, len(data), WRITE_CHUNK):
            self._again(handle, offset + start,
                        functools.partial(self.write, handle, data[start:start + WRITE_CHUNK]))

    def read_at(self, handle: int, offset: int, count: int = CHUNK) -> tuple[bytes, bool]:
        """(data, eof) of one read at OFFSET, the file's position being OFFSET."""
        result: tuple[bytes, bool] = self._again(handle, offset,
                                                 lambda: self.read(handle, count))
        return result

    def _again(self, handle: int, offset: int, step: Callable[[], Any]) -> Any:
        """STEP, again after a seek back to OFFSET when its answer did not come in time.
        libvirt gives up on an answer after its timeout and then re-synchronises the
        channel (guest-sync, 5 s) before the next command; qemu-ga may have done the
        read or write meanwhile, so the retry goes back to where it started: the same
        bytes land at the same place, a read returns the same bytes."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if attempt > 1:
                    self.seek(handle, offset, "set")
                return step()
            except ControlError as e:
                if e.code != "agent-silent" or attempt == ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def seek(self, handle: int, offset: int = 0, whence: str = "cur") -> None:
        """Also clears the stream's end-of-file flag: glibc's EOF is sticky, so a file
        read to its end gives nothing more until then, however much it grows."""
        self.command("guest-file-seek", {"handle": handle, "offset": offset, "whence": whence})

    def close(self, handle: int) -> None:
        self.command("guest-file-close", {"handle": handle})

    # -- programs -----------------------------------------------------------------------

    def spawn(self, argv: list[str], *, capture: bool = False, stdin: bytes | None = None,
              env: list[str] | None = None) -> int:
        """Start ARGV in the guest; its PID there."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": capture}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        if env:
            args["env"] = env
        value = self.command("guest-exec", args)
        if not isinstance(value, dict):
            raise ControlError("guest-exec: the agent's answer is malformed", "protocol")
        return expect_int(value.get("pid"), "guest-exec")

    def status(self, pid: int, keep: int = MAX_OUTPUT) -> ExecStatus | None:
        """The program's end (the last KEEP bytes of its captured output), None while
        it runs."""
        value = self.command("guest-exec-status", {"pid": pid})
        if not isinstance(value, dict):
            raise ControlError("guest-exec-status: the agent's answer is malformed", "protocol")
        if not value.get("exited"):
            return None
        return ExecStatus.from_reply(value, keep)

    def run(self, argv: list[str], timeout: float = 30, stdin: bytes | None = None,
            env: list[str] | None = None, keep: int = MAX_OUTPUT) -> ExecStatus:
        """Run ARGV to its end with its output captured (the last KEEP bytes of each
        stream); killed and ControlError(code timeout) after TIMEOUT seconds."""
        pid = self.spawn(argv, capture=True, stdin=stdin, env=env)
        deadline = time.monotonic() + timeout
        pause = POLL_FIRST
        while (result := self.status(pid, keep)) is None:
            if time.monotonic() >= deadline:
                self.kill(pid)
                raise ControlError(f"{argv[0]} did not end within {timeout:g}s in the guest",
                                   "timeout")
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
        return result

    def kill(self, pid: int) -> None:
        """SIGKILL PID's process group (exec makes one with setsid) and PID itself."""
        # No "--": dash's kill takes it for a PID; a negative PID after the signal is a group.
        script = 'kill -KILL -"$1" 2>/dev/null; kill -KILL "$1" 2>/dev/null; true'
        try:
            self.spawn(["/bin/sh", "-c", script, "qemu-unit-kill", str(pid)])
        except ControlError:
            pass  # it may be gone already; the caller reports what it was doing


@dataclass(frozen=True)
class ExecStatus:
    """How a program in the guest ended: exit code or signal, and captured output."""

    exitcode: int | None
    signal: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False

    @classmethod
    def from_reply(cls, value: dict[str, Any], keep: int = MAX_OUTPUT) -> ExecStatus:
        exitcode, sig = value.get("exitcode"), value.get("signal")
        for field in (exitcode, sig):
            if field is not None and not (isinstance(field, int) and 0 <= field < 1 << 16):
                raise ControlError("guest-exec-status: a malformed exit status", "protocol")
        out = decode(value.get("out-data", ""), 16 << 20, "guest-exec-status")
        err = decode(value.get("err-data", ""), 16 << 20, "guest-exec-status")
        return cls(
            exitcode=exitcode, signal=sig,
            stdout=out[-keep:], stderr=err[-keep:],
            truncated=bool(value.get("out-truncated") or value.get("err-truncated"))
            or len(out) > keep or len(err) > keep,
        )

    @property
    def status(self) -> int:
        """As a shell says it: the exit code, or 128+N for signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exitcode if self.exitcode is not None else 255

    def message(self) -> str:
        """One line about the program's end: its last line of stderr (or stdout)."""
        for text in (self.stderr, self.stdout):
            lines = text.decode(errors="replace").strip().splitlines()
            if lines:
                return lines[-1][:300]
        return f"exit status {self.status}"


def parse_reply(execute: str, reply: Any) -> Any:
    if not isinstance(reply, str):
        raise ControlError(f"{execute}: no answer from the guest agent", "protocol")
    if len(reply) > MAX_REPLY + 4096:
        raise ControlError(f"{execute}: the guest agent's answer is larger than "
                           f"{MAX_REPLY} bytes", "protocol")
    try:
        value = json.loads(reply)
    except ValueError:
        raise ControlError(f"{execute}: the guest agent's answer is not JSON",
                           "protocol") from None
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        desc = str(value["error"].get("desc") or "failed").splitlines()[0][:300]
        raise ControlError(f"{execute}: {desc}", "agent-error")
    if not isinstance(value, dict) or "return" not in value:
        raise ControlError(f"{execute}: the guest agent's answer is malformed", "protocol")
    return value["return"]


def decode(text: Any, limit: int, what: str) -> bytes:
    """Base64 from the guest: a string, valid, at most LIMIT bytes once decoded."""
    if not isinstance(text, str) or len(text) > (limit + 2) // 3 * 4:
        raise ControlError(f"{what}: the agent sent more or other than asked for", "protocol")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError(f"{what}: the agent's base64 does not decode", "protocol") from None


def expect_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ControlError(f"{what}: the agent's answer is malformed", "protocol")
    return value
