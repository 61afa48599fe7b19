"""The harness itself: the container, the test guest and the test venv really work."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from qemu_unit.cli import demo
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
        # no pause: the guest opens the button before it says "booted", no press is lost
        vm.monitor("system_powerdown")
        vm.wait_for("qemu-unit-guest: power button pressed", timeout=10)
        assert vm.wait_exit(timeout=10) == 0


def test_venv_has_this_tree_installed_for_a_service_user(qemu_unit_bin: Path) -> None:
    assert qemu_unit_bin == VENV_DIR / "bin/qemu-unit"
    # everyone may run it: the service user qemu-run is not root
    assert qemu_unit_bin.stat().st_mode & stat.S_IXOTH
    python = VENV_DIR / "bin/python"
    where = subprocess.run(
        [str(python), "-c", "import qemu_unit.cli.demo as d, libvirt; print(d.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    ).stdout.strip()
    installed = Path(where)
    assert VENV_DIR in installed.parents  # the installed copy, not the source tree
    assert installed.read_bytes() == Path(demo.__file__).read_bytes()
    for path in (installed, installed.parent, VENV_DIR / "bin/python"):
        assert path.stat().st_mode & stat.S_IROTH, path


def test_a_hung_systemd_nspawn_is_killed_with_everything_inside() -> None:
    ct = Container("hung", stop_timeout=1)
    with pytest.raises(RuntimeError, match="hung"), ct:
        ns = os.readlink(f"/proc/{ct.leader}/ns/pid")
        ct.run("systemd-run", "--unit=sleeper", "sleep", "1000")
        assert ct._nspawn is not None
        # a stopped nspawn cannot act on SIGTERM: teardown must fall back to SIGKILL
        os.kill(ct._nspawn.pid, signal.SIGSTOP)
        raise RuntimeError("hung")
    assert not ct.running()
    assert _pids_in_ns(ns) == []
    assert not ct.dir.exists()


def test_a_failing_prepare_leaves_nothing_behind() -> None:
    def prepare(upper: Path) -> None:
        raise OSError("prepare failed")

    ct = Container("badprep", prepare)
    with pytest.raises(OSError, match="prepare failed"), ct:
        pass
    assert not ct.dir.exists()
    assert _mounts_under(ct.dir) == []


def test_test_guest_reaches_the_host_through_user_networking() -> None:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello-from-the-host")

        def log_message(self, format: str, *args: object) -> None:
            pass

    # slirp forwards the guest's 10.0.2.2 to the host's loopback
    with http.server.HTTPServer(("127.0.0.1", 0), Hello) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://10.0.2.2:{server.server_address[1]}/"
        try:
            with bare_qemu("net", f"qemu_unit.url={url}",
                           qemu_args=["-nic", "user,model=virtio-net-pci"]) as vm:
                vm.wait_for("qemu-unit-guest: ip 10.0.2.15", timeout=30)
                vm.wait_for("qemu-unit-guest: fetched hello-from-the-host", timeout=20)
        finally:
            server.shutdown()


def test_test_guest_keeps_an_efi_variable_across_boots(tmp_path: Path) -> None:
    vars_fd = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile("/usr/share/OVMF/OVMF_VARS.fd", vars_fd)
    uefi = ["-machine", "q35",
            "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}"]
    for expected in ("qemu-unit-guest: efivar created", "qemu-unit-guest: efivar=round-trip"):
        with bare_qemu("efivar", "qemu_unit.efivar=round-trip", qemu_args=uefi) as vm:
            vm.wait_for(expected, timeout=60)
            vm.monitor("system_powerdown")
            vm.wait_for("qemu-unit-guest: power button pressed", timeout=10)
            assert vm.wait_exit(timeout=10) == 0
