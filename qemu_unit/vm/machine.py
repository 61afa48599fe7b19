"""Registering a running VM with systemd-machined (`machinectl list/status/poweroff`).

systemd 252's machined lets only root call RegisterMachine: its D-Bus policy
(org.freedesktop.machine1.conf) allows unprivileged callers a list of methods
without it, and there is no polkit action for registering (the actions are
login, shell, open-pty, manage-machines, manage-images and their host- forms).
The runner stays unprivileged; qemu-run-register@NAME.service registers it as root
once qemu-run@NAME is active, with one busctl call from a shell, and runs
`qemu-unit register-machine %i` (this module) only when machined refuses that call:
a registration of the same unit left by an earlier runner is replaced here, any
other refusal is explained. The runner's PID ($MAINPID) is the machine's leader,
so `machinectl poweroff` sends SIGRTMIN+4 to the runner, which shuts the guest
down gracefully. machined forgets the machine when the unit stops. This helper
reads no input but the VM name, $MAINPID and the UUID from the runner's status
file, each checked, and talks to machined only.
"""

from __future__ import annotations

import json
import os
import re
import uuid as uuidlib
from pathlib import Path

from qemu_unit import command, log
from qemu_unit.config.names import check_name
from qemu_unit.errors import QemuUnitError
from qemu_unit.paths import SYSTEM_RUNTIME, unit_name
from qemu_unit.vm import status

# typing (~1.7 ms) for mypy only: this runs as root at every start of a VM.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SERVICE = "qemu-unit"
CLASS = "vm"
BUS = ("org.freedesktop.machine1", "/org/freedesktop/machine1",
       "org.freedesktop.machine1.Manager")  # fmt: skip
MACHINE_INTERFACE = "org.freedesktop.machine1.Machine"
# machined's machine_name_is_valid(): a host name (letters, digits, '-', '_', dots
# between labels), at most 64 characters.
_MACHINE_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}(?<!\.)")


def is_machine_name(name: str) -> bool:
    return _MACHINE_NAME.fullmatch(name) is not None


def _busctl(*args: str) -> Any:
    """Run busctl on the system bus; its JSON answer, or QemuUnitError with its message."""
    try:
        out = command.run(["busctl", "--system", "--json=short", *args], f"busctl {args[0]}")
    except command.CommandError as e:
        raise QemuUnitError(e.detail or str(e)) from None
    return json.loads(out) if out.strip() else None


def _machine_property(path: str, name: str) -> Any:
    return _busctl("get-property", BUS[0], path, MACHINE_INTERFACE, name)["data"]


def read_uuid(root: Path) -> str | None:
    """The domain UUID from the runner's status file (written by the unprivileged runner:
    checked, never trusted)."""
    record = status.read(root)
    value = record.uuid if record else None
    try:
        return str(uuidlib.UUID(value)) if value is not None else None
    except ValueError:
        return None


def _register(name: str, leader: int, uuid: str | None) -> str:
    id_bytes = list(uuidlib.UUID(uuid).bytes) if uuid else []
    answer = _busctl(
        "call", *BUS, "RegisterMachine", "sayssus",
        name, str(len(id_bytes)), *map(str, id_bytes), SERVICE, CLASS, str(leader), "",
    )  # fmt: skip
    return str(answer["data"][0])


def register(name: str, leader: int, uuid: str | None) -> str:
    """Register NAME with LEADER as a machine of class vm; a registration left by an
    earlier runner of the same unit is replaced. Returns machined's object path."""
    try:
        # The usual case, no machine of that name: one call (each busctl is a process
        # at every start, and ten VMs start side by side at boot).
        return _register(name, leader, uuid)
    except QemuUnitError as refused:
        try:
            path = _busctl("call", *BUS, "GetMachine", "s", name)["data"][0]
        except QemuUnitError:
            raise refused from None  # not a name taken: machined's reason stands
    owner = _machine_property(path, "Unit")
    if owner != unit_name(name):
        raise QemuUnitError(f"machine name {name!r} is taken by {owner or 'another machine'}")
    if _machine_property(path, "Leader") == leader:
        return str(path)
    # Restart=: machined keeps a machine while its unit is active, leader gone or not.
    _busctl("call", *BUS, "UnregisterMachine", "s", name)
    return _register(name, leader, uuid)


def register_from_unit(name: str, roots: Path = SYSTEM_RUNTIME) -> int:
    """`qemu-unit register-machine NAME`, qemu-run-register@NAME.service's fallback when
    machined refuses its busctl call (MAINPID: the VM unit's). Never fails: a VM without
    a machined entry still runs (exit 0, a warning says why)."""
    check_name(name)
    if not is_machine_name(name):
        log.log.warning("Not registered with systemd-machined: %r is not a valid machine name "
                       "(a host name)", name)
        return 0
    pid = os.environ.get("MAINPID", "")
    if not pid.isdigit() or int(pid) <= 1:
        log.log.warning("Not registered with systemd-machined: no $MAINPID (%r)", pid)
        return 0
    uuid = read_uuid(roots / name)
    log.set_vm_fields(name, uuid)
    try:
        path = register(name, int(pid), uuid)
    except QemuUnitError as e:
        log.log.warning("Not registered with systemd-machined: %s", e)
        return 0
    log.log.info("Registered with systemd-machined as %s (leader %s)", path, pid)
    return 0
