"""The runner's status file: what a running VM is, as only the runner knows it.

`ROOT/status.json` in the VM's runtime directory (/run/qemu-run/NAME under the
unit): the accelerator actually used, the domain UUID, QEMU's PID, published
ports. Written atomically (rename), so a reader sees the old or the new file,
never half of one; it goes away with the runtime directory when the unit stops.
`qemu-unit list` and `status` read it; systemd answers everything else.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from qemu_unit.paths import STATUS_FILE, qemu_pidfile

FILENAME = STATUS_FILE
VERSION = 1


def write(root: Path, **fields: Any) -> None:
    """Replace ROOT/status.json with FIELDS (plus the format version)."""
    data = {"version": VERSION, **fields}
    fd, tmp = tempfile.mkstemp(prefix=".status.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.write("\n")
        # Readable by root and the VM's user only: the runtime directory is 0700 anyway.
        os.replace(tmp, root / FILENAME)
    except BaseException:
        os.unlink(tmp)
        raise


MAX_SIZE = 64 * 1024


def read(root: Path) -> dict[str, Any] | None:
    """The status file's fields; None when there is none, it is unreadable or not ours.

    Root reads what the unprivileged runner wrote: no symlinks, no FIFOs, no more
    than MAX_SIZE bytes."""
    try:
        fd = os.open(root / FILENAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, MAX_SIZE))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return None
    return data


def qemu_pid(root: Path, name: str) -> int | None:
    """QEMU's PID from the pid file libvirt's embed driver keeps in ROOT."""
    try:
        return int(qemu_pidfile(root, name).read_text().strip())
    except (OSError, ValueError):
        return None


_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}  # fmt: skip


def resources(root: ET.Element) -> tuple[int | None, int | None]:
    """(memory in bytes, vCPUs) a <domain> asks for; None for what it does not say."""
    memory = cpus = None
    el = root.find("memory")
    if el is not None and el.text:
        scale = _UNITS.get(el.get("unit", "KiB").lower())
        if scale is not None and el.text.strip().isdigit():
            memory = int(el.text) * scale
    el = root.find("vcpu")
    if el is not None and el.text and el.text.strip().isdigit():
        cpus = int(el.text)
    return memory, cpus
