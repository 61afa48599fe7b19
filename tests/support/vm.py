"""Helpers for system tests that run VMs as qemu-run@NAME.service in a container."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.support.container import Container
from tests.support.guest import build_test_guest, cmdline

# Inside the container, outside /tmp and /var/tmp: the unit's PrivateTmp= hides those.
GUEST_DIR = Path("/srv/qemu-unit-test")
CONFIG_DIR = Path("/etc/qemu-run")

T = TypeVar("T")


def stage_guest(upper: Path) -> None:
    """Copy the test guest into the container's upper layer (call from `prepare`)."""
    guest = build_test_guest()
    dest = upper / GUEST_DIR.relative_to("/")
    dest.mkdir(parents=True, exist_ok=True)
    for parent in (dest, *dest.relative_to(upper).parents):
        (upper / parent).chmod(0o755)
    for src, name in ((guest.kernel, "vmlinuz"), (guest.initrd, "initrd.img")):
        shutil.copyfile(src, dest / name)
        (dest / name).chmod(0o644)


def vm_text(
    mode: str,
    *,
    vm: str = "",
    unit: str = "",
    service: str = "",
    install: str = "",
    cmdline_extra: str = "",
) -> str:
    """A .vm file booting the test guest in MODE under TCG, without network."""
    text = ""
    if unit:
        text += f"[Unit]\n{unit.strip()}\n\n"
    text += (
        "[VM]\n"
        "Memory=256M\n"
        "Accel=tcg\n"
        "Machine=pc\n"
        "Network=none\n"
        f"Kernel={GUEST_DIR}/vmlinuz\n"
        f"Initrd={GUEST_DIR}/initrd.img\n"
        f"KernelCmdline={cmdline(mode, *cmdline_extra.split())}\n"
    )
    if vm:
        text += vm.strip() + "\n"
    if service:
        text += f"\n[Service]\n{service.strip()}\n"
    if install:
        text += f"\n[Install]\n{install.strip()}\n"
    return text


def cold_cache(upper: Path) -> None:
    """Hide the host's (warm) capability cache: the container starts cold (call from `prepare`).
    An opaque directory in the upper layer shows none of the lower layer's entries."""
    cache = upper / "var/cache/qemu-run"
    cache.mkdir(parents=True)
    os.setxattr(cache, "trusted.overlay.opaque", b"y")


def write_vm(upper: Path, name: str, text: str, suffix: str = ".vm") -> None:
    """Write NAME.vm into the upper layer before boot."""
    d = upper / CONFIG_DIR.relative_to("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}{suffix}").write_text(text)


def put_file(ct: Container, path: str | Path, text: str) -> None:
    """Write a file inside a running container (the upper layer is not written directly:
    overlayfs does not promise to show changes made under it while mounted)."""
    ct.run("sh", "-c", f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}'", input=text)


def install_qemu_unit(ct: Container, qemu_unit_bin: Path) -> None:
    ct.run(str(qemu_unit_bin), "install")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def prop(ct: Container, unit: str, name: str) -> str:
    return ct.systemctl("show", "-P", name, unit).stdout.strip()


def qemu_pids(ct: Container, vm: str | None = None) -> list[int]:
    pattern = f"qemu-system.*guest={vm}," if vm else "qemu-system"
    out = ct.run("pgrep", "-f", pattern, check=False).stdout
    return [int(p) for p in out.split()]


def invocation(ct: Container, vm: str) -> str:
    """The InvocationID of VM's unit: this start's (take it while the unit runs: an
    inactive unit may be unloaded, and its ID with it)."""
    found = prop(ct, f"qemu-run@{vm}.service", "InvocationID")
    assert found, f"qemu-run@{vm}.service has no invocation"
    return found


def _lines(ct: Container, vm: str, identifier: str, of: str | None) -> str:
    # One start's lines only when OF (an invocation ID) is given: a shared container's
    # journal keeps every earlier start of the same VM.
    match = [f"_SYSTEMD_INVOCATION_ID={of}"] if of else ["-u", f"qemu-run@{vm}.service"]
    return ct.journal(*match, "-t", identifier, "-o", "cat")


def console(ct: Container, vm: str, of: str | None = None) -> str:
    """The guest's console lines, as an administrator selects them (of invocation OF)."""
    return _lines(ct, vm, "qemu-unit-console", of)


def runner_log(ct: Container, vm: str, of: str | None = None) -> str:
    return _lines(ct, vm, "qemu-unit", of)


def assert_graceful_stop(ct: Container, vm: str, of: str) -> None:
    """After `systemctl stop`: the guest of invocation OF saw the power button, the unit
    ended well, no QEMU."""
    unit = f"qemu-run@{vm}.service"
    assert "qemu-unit-guest: power button pressed" in console(ct, vm, of)
    assert prop(ct, unit, "ActiveState") == "inactive"
    assert prop(ct, unit, "Result") == "success"
    assert qemu_pids(ct, vm) == []


def memory_kb(ct: Container, pid: int | str) -> tuple[int, int]:
    """PSS and USS (private clean + dirty) of PID in kB, from /proc/PID/smaps_rollup."""
    fields = {}
    for line in ct.run("cat", f"/proc/{pid}/smaps_rollup").stdout.splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]
