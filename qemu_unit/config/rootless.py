"""Rootless VMs: a user's own .vm files under the user's systemd manager.

`qemu-unit --user ...` and the user generator (run by `systemd --user`, which
sets SYSTEMD_SCOPE=user) read the user's search path instead of the system's
(source.search_path(user=True), paths.user_search_path), as rootless Quadlet
does: $XDG_CONFIG_HOME/qemu-run (default ~/.config/qemu-run), then
/etc/qemu-run/users/UID and /etc/qemu-run/users (what an administrator gives one
user or every user). The same .vm means the same VM; what would need
root is refused with one line naming the reason (refusals()).

Import-light (the user generator loads it at every user manager start).
"""

from __future__ import annotations

from qemu_unit.config.settings import HostShutdown, NetworkKind, VMConfig
from qemu_unit.config.unitfile import Entry
from qemu_unit.errors import ConfigError

# The system manager's boot target has no counterpart in a user manager: a .vm
# wanted by it is wanted by the user manager's default.target (started at login,
# or at boot with `loginctl enable-linger`).
SYSTEM_TARGET = "multi-user.target"
USER_TARGET = "default.target"


def user_target(target: str) -> str:
    return USER_TARGET if target == SYSTEM_TARGET else target


def refusals(vm: VMConfig) -> list[ConfigError]:
    """What VM needs that a user's manager cannot give it: one error per assignment."""
    problems = []
    for network, entry in zip(vm.networks, _entries(vm, "Network"), strict=False):
        if network.kind in (NetworkKind.TAP, NetworkKind.BRIDGE):
            problems.append(_refuse(entry, vm, "Network", f"{network.kind}:{network.target} "
                                    "needs root (a tap device or qemu-bridge-helper); a user's "
                                    "VM has Network=user"))
    for disk in vm.disks:
        if str(disk.path).startswith("/dev/"):
            problems.append(_refuse(disk.entry, vm, "Disk", f"{disk.path} is a host device: "
                                    "a system VM's (/etc/qemu-run), not a user's"))
    if vm.image_source is not None:
        problems.append(_refuse(vm.origin("Image"), vm, "Image", "a URL is pulled by the "
                                "system's qemu-run-pull@ unit into the shared cache; a user's VM "
                                "names a local image (qemu-unit image pull, then its path)"))
    for share in vm.shares:
        problems.append(_refuse(share.entry, vm, "Share", "virtiofsd runs as root in a system "
                                "unit (qemu-run-virtiofsd@); a user's VM has no shares"))
    if vm.host_shutdown is HostShutdown.SAVE:
        problems.append(_refuse(vm.origin("HostShutdown"), vm, "HostShutdown",
                                "save tells a host shutdown from a stop by asking the system's "
                                "manager as root (the system unit's ExecStop=+ step); a user's "
                                "VM saves with qemu-unit --user save"))
    if vm.snapshot_schedule is not None:
        problems.append(_refuse(vm.origin("SnapshotSchedule"), vm, "SnapshotSchedule",
                                "its timer starts the system's qemu-run-snapshot@ template; "
                                "a user's VM takes snapshots with qemu-unit --user snapshot "
                                "create"))
    if vm.backup_schedule is not None:
        problems.append(_refuse(vm.origin("BackupSchedule"), vm, "BackupSchedule",
                                "its timer starts the system's qemu-run-backup@ template; "
                                "a user's VM is backed up with qemu-unit --user backup"))
    if vm.domain_xml is not None:
        problems.append(_refuse(vm.origin("DomainXML"), vm, "DomainXML",
                                "a user's VM is described by .vm keys (the domain XML can "
                                "name host devices and networks that need root)"))
    return problems


def _entries(vm: VMConfig, key: str) -> list[Entry | None]:
    found: list[Entry | None] = [e for e in vm.origins if e.key == key]
    # Without Network= the one user interface is the default: nothing to refuse.
    return found or [None] * len(vm.networks)


def _refuse(entry: Entry | None, vm: VMConfig, key: str, message: str) -> ConfigError:
    if entry is None:
        return ConfigError(f"not in a user's VM: {message}", path=vm.source_path, key=key)
    return ConfigError(f"not in a user's VM: {message}", path=entry.path, line=entry.line,
                       key=key)
