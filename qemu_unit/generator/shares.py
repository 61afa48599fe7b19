"""Share=: the virtiofsd companion unit of each share, and what the VM's unit needs of it.

Debian 12's virtiofsd needs root (FACTS.md), the VM's unit has no privileges: each
share gets a unit of its own, `qemu-run-virtiofsd@NAME:TAG.service`, written in
full here. It is bound to the VM's unit (BindsTo=, PartOf=: started with it, stopped
and restarted with it, never alone) and ordered before it; virtiofsd itself exits
when QEMU disconnects. Its sandbox: virtiofsd's own (mount, PID and network
namespaces, pivot_root into HOSTDIR, seccomp), inside systemd's (a read-only system,
HOSTDIR the only path it may write, read-only for :ro, no network, a bounded set of
capabilities). Its socket lies in a directory of group qemu-run, mode 0750; a VM with a
user of its own (DynamicUser=, allocated only when its unit starts, after virtiofsd's)
takes the directory and socket over in a root step of its unit (handover_lines): only
that VM's user reaches them, not the other VMs' nor qemu-run's.

Pure: strings from the VMConfig; the only host look-ups are the warnings.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qemu_unit import paths
from qemu_unit.config import settings

# What virtiofsd keeps (its own capng set) plus what its namespace sandbox needs.
CAPABILITIES = ("CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_FSETID CAP_SETGID CAP_SETUID "
                "CAP_MKNOD CAP_SETFCAP CAP_SYS_ADMIN CAP_SETPCAP")
# How long virtiofsd may take to listen before the VM's start fails.
START_TIMEOUT_SEC = 30

_HOME_DIRS = ("/home/", "/root/", "/run/user/")
_TMP_DIRS = ("/tmp/", "/var/tmp/")


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return (path.rstrip("/") + "/").startswith(dirs)


def companion_unit(vm: settings.VMConfig, share: settings.Share, header: str,
                   quote: Callable[[str], str]) -> str:
    """The unit file of SHARE's virtiofsd (HEADER: the generator's comment lines)."""
    vm_unit = paths.unit_name(vm.name)
    hostdir = str(share.path)
    sock = str(paths.virtiofsd_socket(vm.name, share.tag))
    # ':' separates RuntimeDirectory='s optional symlink (systemd 250+): escape it.
    runtime = paths.virtiofsd_runtime_dir(vm.name, share.tag).replace(":", "\\:")
    mode = "read-only" if share.readonly else "read-write"
    lines = [
        header.rstrip("\n"),
        "[Unit]",
        f"Description=virtiofsd: share {share.tag} of VM {vm.name} ({mode})",
        "Documentation=man:qemu-run.vm(5)",
        f"SourcePath={quote(str(vm.source_path))}",
        f"BindsTo={vm_unit}",
        f"PartOf={vm_unit}",
        f"Before={vm_unit}",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={paths.VIRTIOFSD} --syslog --socket-path={sock} "
        f"--socket-group={paths.SHARE_SOCKET_GROUP} -o {quote('source=' + hostdir)} "
        "-o sandbox=namespace -o cache=auto",
        # virtiofsd listens, then waits for QEMU: the VM starts once the socket is there.
        f"ExecStartPost=/bin/sh -c 'until [ -S {sock} ]; do sleep 0.05; done'",
        f"TimeoutStartSec={START_TIMEOUT_SEC}",
        "TimeoutStopSec=10",
        # virtiofsd holds a descriptor per file the guest looked up and raises its limit to
        # 1000000 only with CAP_SYS_RESOURCE: at systemd's 1024 a share ended near 1000 files.
        "LimitNOFILE=1000000",
        # The runtime directory gets this group: QEMU, as the VM's user, reaches the socket.
        f"Group={paths.SHARE_SOCKET_GROUP}",
        f"RuntimeDirectory={runtime}",
        "RuntimeDirectoryMode=0750",
        # Its lock files (/run/virtiofsd/*.pid), private to this share.
        "TemporaryFileSystem=/run/virtiofsd",
        "ProtectSystem=strict",
        f"{'ReadOnlyPaths' if share.readonly else 'ReadWritePaths'}={quote(hostdir)}",
    ]
    if _under(hostdir, _HOME_DIRS):
        lines.append(f"ProtectHome={'read-only' if share.readonly else 'no'}")
    else:
        lines.append("ProtectHome=yes")
    lines.append(f"PrivateTmp={'no' if _under(hostdir, _TMP_DIRS) else 'yes'}")
    lines += [
        "PrivateNetwork=yes",
        "IPAddressDeny=any",
        "RestrictAddressFamilies=AF_UNIX",
        # Not PrivateDevices=: it takes CAP_MKNOD, which virtiofsd insists on keeping.
        "DevicePolicy=closed",
        "NoNewPrivileges=yes",
        f"CapabilityBoundingSet={CAPABILITIES}",
        "RestrictNamespaces=mnt pid net",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "",
    ]
    return "\n".join(lines)


def files(vm: settings.VMConfig, header: str,
          quote: Callable[[str], str]) -> tuple[tuple[str, str], ...]:
    """(relative path, text) of every companion unit of VM."""
    return tuple((paths.virtiofsd_unit_name(vm.name, s.tag), companion_unit(vm, s, header, quote))
                 for s in vm.shares)


def unit_dependencies(vm: settings.VMConfig) -> list[tuple[str, str]]:
    """[Unit] lines of the VM's unit: it needs each share's daemon, started first."""
    out = []
    for share in vm.shares:
        unit = paths.virtiofsd_unit_name(vm.name, share.tag)
        out += [("Requires", unit), ("After", unit)]
    return out


def handover_lines(vm: settings.VMConfig, user: str) -> list[tuple[str, str]]:
    """[Service] lines of the VM's unit that give each share's socket and its directory to
    USER, the VM's dynamic user (its name resolves through nss-systemd once allocated).
    Root-owned until then, written by root virtiofsd: nothing there for -h to follow."""
    out = []
    for share in vm.shares:
        sock = paths.virtiofsd_socket(vm.name, share.tag)
        out.append(("ExecStartPre",
                    f"+/bin/chown -h {user}:{user} {sock} {sock.parent}"))
    return out


def warnings(vm: settings.VMConfig) -> tuple[str, ...]:
    """What would fail the start now (a directory may be on a file system mounted later)."""
    out = []
    if vm.shares and not os.access(paths.VIRTIOFSD, os.X_OK):
        out.append(f"{vm.source_path}: Share=: {paths.VIRTIOFSD} not found (install the "
                   "Debian package qemu-system-common)")
    for share in vm.shares:
        if not os.path.isdir(share.path):
            out.append(f"{vm.source_path}: Share=: {share.path} is not a directory (yet)")
    return tuple(out)
