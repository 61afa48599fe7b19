"""The harness itself: the container, the test guest and the test venv really work."""

from __future__ import annotations

import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from qemu_unit import demo
from tests.support.container import Container, _mounts_under, _pids_in_ns
from tests.support.guest import bare_qemu, cmdline
from tests.support.venv import VENV_DIR


def _qemu_pids_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"qemu-system-x86_64") and marker.encode() in argv:
            found.append(int(entry))
    return found


def test_container_boots_runs_commands_and_sees_prepared_files() -> None:
    def prepare(upper: Path) -> None:
        (upper / "etc/qemu-unit-harness").write_text("prepared\n")

    with Container("harness", prepare) as ct:
        assert ct.run("systemctl", "is-system-running", check=False).stdout.strip() in (
            "running", "degraded")
        assert ct.boot_seconds < 30
        # systemd really is PID 1 inside, unlike on the host
        assert ct.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
        assert ct.run("cat", "/etc/qemu-unit-harness").stdout == "prepared\n"
        (ct.upper / "etc/late").write_text("written while running\n")
        assert ct.run("cat", "/etc/late").stdout == "written while running\n"
        assert ct.run("sh", "-c", "read x; echo got $x", input="hi\n").stdout == "got hi\n"
        assert ct.run("false", check=False).returncode == 1
        # writes inside stay in the upper layer, not on the host
        ct.run("touch", "/etc/qemu-unit-harness-inside")
        assert (ct.upper / "etc/qemu-unit-harness-inside").exists()
        assert not Path("/etc/qemu-unit-harness-inside").exists()
        ct.run("systemd-run", "--unit=hello", "--wait", "echo", "hello from a unit")
        assert "hello from a unit" in ct.wait_journal("hello from a unit", "-u", "hello",
                                                      "-o", "cat", timeout=10)
        assert ct.poweroff() == 0
    assert not ct.dir.exists()


def test_cleanup_after_a_failed_test_leaves_nothing_behind(guest: demo.Guest) -> None:
    marker = f"qemu-unit-harness-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match="the test failed"), Container("cleanup") as ct:
        ns = os.readlink(f"/proc/{ct.leader}/ns/pid")
        ct.run("systemd-run", "--unit=sleeper", "sleep", "1000")
        # a QEMU inside, as a VM unit would have, printing its console to the journal
        ct.run("systemd-run", "--unit=vm", "-p", "StandardOutput=journal",
               "qemu-system-x86_64", "-name", marker, "-accel", "tcg", "-m", "256",
               "-nodefaults", "-display", "none", "-serial", "stdio",
               "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
               "-append", cmdline("wait"))
        ct.wait_journal("qemu-unit-guest: booted", "-u", "vm", "-o", "cat", timeout=30)
        assert _qemu_pids_with(marker)
        raise RuntimeError("the test failed")
    assert _mounts_under(ct.dir) == []
    assert not ct.dir.exists()
    assert not ct.running()
    assert _pids_in_ns(ns) == []
    assert _qemu_pids_with(marker) == []


def test_test_guest_powers_off_under_bare_qemu() -> None:
    start = time.monotonic()
    with bare_qemu("poweroff") as vm:
        vm.wait_for("qemu-unit-guest: booted", timeout=30)
        vm.wait_for("qemu-unit-guest: powering off", timeout=10)
        assert vm.wait_exit(timeout=10) == 0
    assert time.monotonic() - start < 30


def test_test_guest_powers_off_on_the_acpi_power_button() -> None:
    with bare_qemu("wait") as vm:
        vm.wait_for("qemu-unit-guest: booted", timeout=30)
        time.sleep(0.3)  # the button listener starts right after the line
        vm.monitor("system_powerdown")
        vm.wait_for("qemu-unit-guest: power button pressed", timeout=10)
        assert vm.wait_exit(timeout=10) == 0


def test_venv_has_this_tree_installed_for_a_service_user(qemu_unit_bin: Path) -> None:
    assert qemu_unit_bin == VENV_DIR / "bin/qemu-unit"
    # everyone may run it: the service user qemu-run is not root
    assert qemu_unit_bin.stat().st_mode & stat.S_IXOTH
    python = VENV_DIR / "bin/python"
    where = subprocess.run(
        [str(python), "-c", "import qemu_unit.demo as d, libvirt; print(d.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    ).stdout.strip()
    installed = Path(where)
    assert VENV_DIR in installed.parents  # the installed copy, not the source tree
    assert installed.read_bytes() == Path(demo.__file__).read_bytes()
    for path in (installed, installed.parent, VENV_DIR / "bin/python"):
        assert path.stat().st_mode & stat.S_IROTH, path
