"""The runner's status file: what a running VM is, as only the runner knows it.

`ROOT/status.json` in the VM's runtime directory (/run/qemu-run/NAME under the
unit): the accelerator actually used, the domain UUID, QEMU's PID, published
ports. One `Status` record: the runner writes it, `qemu-unit list`/`status` and
`register-machine` read it; systemd answers everything else. Written atomically
(rename), so a reader sees the old or the new file, never half of one; it goes
away with the runtime directory when the unit stops.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from qemu_unit.paths import STATUS_FILE, qemu_pidfile
from qemu_unit.records import NamedTuple

FILENAME = STATUS_FILE
VERSION = 1
# Root reads what the unprivileged runner wrote: no more than this, no deeper nesting
# than json's recursion allows (a RecursionError is a refusal like any other).
MAX_SIZE = 64 * 1024


class Port(NamedTuple):
    """One PublishPort= as the runner set it up."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str


class Health(NamedTuple):
    """HealthCmd= as the runner last saw it (vm/health.py keeps it current)."""

    status: str = "starting"  # starting, healthy, unhealthy
    failing_streak: int = 0
    last_output: str = ""  # one line, bounded
    last_exit_code: int | None = None
    last_check: float | None = None  # seconds since the epoch, when the last check ended
    checks: int = 0

    @classmethod
    def from_json(cls, data: Any) -> Health | None:
        if not isinstance(data, dict) or data.get("status") not in (
                "starting", "healthy", "unhealthy"):
            return None
        streak, checks = data.get("failing_streak"), data.get("checks")
        code, when, output = data.get("last_exit_code"), data.get("last_check"), \
            data.get("last_output")
        return cls(
            status=data["status"],
            failing_streak=streak if isinstance(streak, int) and streak >= 0 else 0,
            last_output=output[:1000] if isinstance(output, str) else "",
            last_exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
            last_check=float(when) if isinstance(when, (int, float))
            and not isinstance(when, bool) else None,
            checks=checks if isinstance(checks, int) and checks >= 0 else 0,
        )


class Status(NamedTuple):
    """The status file's content. Read back from a file the runner wrote: every field
    checked for its type, a field of the wrong type is None (never trusted further)."""

    name: str | None = None
    pid: int | None = None  # the runner's: systemd's MainPID when it is current
    qemu_pid: int | None = None
    uuid: str | None = None
    accelerator: str | None = None  # "kvm" or "tcg": what the VM really runs with
    memory: int | None = None  # bytes
    cpus: int | None = None
    ports: tuple[Port, ...] = ()
    started: int | None = None  # seconds since the epoch
    health: Health | None = None  # HealthCmd= VMs only

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, **self._asdict(), "ports": [p._asdict() for p in self.ports],
                "health": None if self.health is None else self.health._asdict()}

    @classmethod
    def from_json(cls, data: Any) -> Status | None:
        """DATA as written by to_json(); None if it is not a status of this version."""
        if not isinstance(data, dict) or data.get("version") != VERSION:
            return None

        def typed(key: str, kind: type) -> Any:
            value = data.get(key)
            # bool is an int to Python, never to the writer.
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        ports = data.get("ports")
        checked = [_port(p) for p in ports] if isinstance(ports, list) else []
        return cls(
            name=typed("name", str), pid=typed("pid", int), qemu_pid=typed("qemu_pid", int),
            uuid=typed("uuid", str), accelerator=typed("accelerator", str),
            memory=typed("memory", int), cpus=typed("cpus", int), started=typed("started", int),
            ports=tuple(p for p in checked if p is not None),
            health=Health.from_json(data.get("health")),
        )


def _port(data: Any) -> Port | None:
    try:
        port = Port(**data) if isinstance(data, dict) else None
    except TypeError:
        return None
    if port is None or not (isinstance(port.host_ip, str) and isinstance(port.protocol, str)
                            and isinstance(port.host_port, int)
                            and isinstance(port.guest_port, int)):
        return None
    return port


def write(root: Path, record: Status) -> None:
    """Replace ROOT/status.json with RECORD."""
    # Here: register-machine, `list` and `status` only read (~3.5 ms with shutil); the runner loads
    # it while createXML runs (runner.LATE_MODULES).
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".status.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record.to_json(), f, sort_keys=True)
            f.write("\n")
        # Readable by root and the VM's user only: the runtime directory is 0700 anyway.
        os.replace(tmp, root / FILENAME)
    except BaseException:
        os.unlink(tmp)
        raise


def read(root: Path) -> Status | None:
    """The status in ROOT; None when there is none, it is unreadable or not ours.

    No symlinks, no FIFOs, no more than MAX_SIZE bytes."""
    try:
        fd = os.open(root / FILENAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, MAX_SIZE))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return Status.from_json(data)


def qemu_pid(root: Path, name: str) -> int | None:
    """QEMU's PID from the pid file libvirt's embed driver keeps in ROOT."""
    try:
        return int(qemu_pidfile(root, name).read_text().strip())
    except (OSError, ValueError):
        return None
