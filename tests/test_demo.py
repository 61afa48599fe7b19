"""The demo guest builder: what goes into the initramfs, caching, permissions, demo.vm."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from qemu_unit.cli import demo
from qemu_unit.config import settings, unitfile
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import host
from tests.support.guest import CACHE_DIR, BareQemu


def read_newc(path: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a gzip'ed cpio newc archive."""
    data = gzip.decompress(path.read_bytes())
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        header = data[pos:pos + 110]
        assert header[:6] == b"070701", f"not newc at {pos}"
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode()
        start = (name_end + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[start:start + filesize])
        pos = (start + filesize + 3) & ~3


def seed_debs(dest: Path) -> Path:
    """Give DEST the session's kernel download (26 MB) so build_guest(DEST) needs no network."""
    (dest / "debs").mkdir(parents=True, exist_ok=True)
    for deb in (CACHE_DIR / "debs").glob("*.deb"):
        try:
            os.link(deb, dest / "debs" / deb.name)
        except OSError:  # another file system
            shutil.copyfile(deb, dest / "debs" / deb.name)
    return dest


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory, guest: demo.Guest) -> Path:
    """A build directory of this module's own that reuses the session's kernel download.

    Each new initramfs unpacks the 26 MB kernel package (~1.5 s), so tests share
    this directory and tell their builds apart by their init scripts.
    """
    return seed_debs(tmp_path_factory.mktemp("demo"))


def test_find_kernel_package_names_a_versioned_cloud_kernel() -> None:
    package, _version = demo._kernel_candidate()
    assert re.fullmatch(r"linux-image-\d+\.\d+\.\d+-\d+-cloud-amd64", package)


def test_initramfs_has_init_busybox_and_plain_modules(dest: Path) -> None:
    g = demo.build_guest(dest, "#!/bin/sh\necho test init\n")
    files = read_newc(g.initrd)
    mode, init = files["init"]
    assert init == b"#!/bin/sh\necho test init\n" and mode & stat.S_IXUSR
    mode, busybox = files["bin/busybox"]
    assert busybox.startswith(b"\x7fELF") and mode & stat.S_IXUSR
    assert stat.S_ISLNK(files["bin/sh"][0]) and files["bin/sh"][1] == b"busybox"
    assert b"wait_power_button" in files["lib/guest.sh"][1]
    # plain ELF: busybox insmod cannot read compressed modules
    assert files["lib/modules/button.ko"][1].startswith(b"\x7fELF")
    assert files["lib/modules/evdev.ko"][1].startswith(b"\x7fELF")
    assert files["lib/modules/order"][1] == b"button\nevdev\n"
    assert g.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # the bzImage boot header magic
    assert "console=ttyS0" in g.cmdline


def test_modules_come_with_their_dependencies_first(dest: Path) -> None:
    g = demo.build_guest(dest, "#!/bin/sh\n", modules=("virtio_net", "evdev"))
    order = read_newc(g.initrd)["lib/modules/order"][1].decode().split()
    assert set(order) >= {"virtio_net", "net_failover", "failover", "virtio", "virtio_ring",
                          "evdev"}
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_net")


def test_unknown_module_is_a_clear_error(dest: Path) -> None:
    with pytest.raises(QemuUnitError, match="no_such_module"):
        demo.build_guest(dest, "#!/bin/sh\n", modules=("no_such_module",))


def test_build_is_cached_and_keyed_on_the_init_script(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = demo.build_guest(dest, "#!/bin/sh\necho one\n")
    mtime = first.initrd.stat().st_mtime_ns
    # Cached: nothing is downloaded, unpacked or built again (whatever apt-cache costs).
    with monkeypatch.context() as m:
        for step in ("_download", "_unpack", "_build_initrd", "_locked"):
            m.setattr(demo, step, lambda *_a, _s=step: pytest.fail(f"{_s} on a cached build"))
        again = demo.build_guest(dest, "#!/bin/sh\necho one\n")
    assert again == first and first.initrd.stat().st_mtime_ns == mtime
    other = demo.build_guest(dest, "#!/bin/sh\necho two\n")
    assert other.kernel == first.kernel and other.initrd != first.initrd
    assert read_newc(other.initrd)["init"][1] == b"#!/bin/sh\necho two\n"
    # only finished files are left behind, no temporary directories
    assert {p.name for p in first.kernel.parent.iterdir()} >= {first.initrd.name,
                                                               other.initrd.name}
    assert not [p for p in dest.rglob("*") if p.name.startswith("tmp") or ".part" in p.name]


def test_everything_is_readable_by_the_unprivileged_vm_user(dest: Path) -> None:
    old = os.umask(0o077)
    try:
        g = demo.build_guest(dest, "#!/bin/sh\necho built under umask 077\n")
        vm_file = demo.write_demo(dest / "new/etc", dest)
    finally:
        os.umask(old)
    for path in (g.kernel, g.initrd, vm_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for d in (g.kernel.parent, dest, dest / "debs", dest / "new", dest / "new/etc"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


def test_write_demo_writes_a_vm_file_settings_accepts(tmp_path: Path, dest: Path) -> None:
    path = demo.write_demo(tmp_path / "etc", dest, runfor=5)
    assert path == tmp_path / "etc/demo.vm"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    entries = {(e.section, e.key): e.value for e in unitfile.parse(path.read_text(), path)}
    assert entries[("Unit", "Description")] == "qemu-unit demo VM"
    assert entries[("VM", "KernelCmdline")].endswith("qemu_unit.runfor=5")
    vm = settings.parse_vm("demo", unitfile.read(path), source_path=path)
    assert vm.memory == 256 * 1024**2 and vm.cpus == 1
    assert vm.kernel is not None and vm.kernel.is_file()
    assert vm.initrd is not None and vm.initrd.is_file()
    host.check_files(vm)
    without = demo.write_demo(tmp_path / "etc", dest)
    assert "runfor" not in without.read_text()


@pytest.mark.system
def test_demo_guest_greets_and_powers_off_by_itself(tmp_path: Path, dest: Path) -> None:
    vm = settings.parse_vm("demo", unitfile.read(demo.write_demo(tmp_path, dest, runfor=1)))
    assert vm.kernel and vm.initrd and vm.kernel_cmdline
    guest = demo.Guest(vm.kernel, vm.initrd, vm.kernel_cmdline)
    with BareQemu(guest, guest.cmdline) as qemu:
        banner = qemu.wait_for("qemu-unit demo guest: hello from", timeout=30)
        assert re.search(r"hello from \d+\.\d+\.\d+-\d+-cloud-amd64", banner)
        qemu.wait_for("1 s are over, powering off", timeout=15)
        assert qemu.wait_exit(timeout=10) == 0


@pytest.mark.system
def test_demo_guest_powers_off_on_the_power_button(dest: Path) -> None:
    guest = demo.build_guest(dest, demo.DEMO_INIT)
    with BareQemu(guest, guest.cmdline) as qemu:
        qemu.wait_for("press the power button", timeout=30)
        qemu.monitor("system_powerdown")
        qemu.wait_for("power button pressed, powering off", timeout=10)
        assert qemu.wait_exit(timeout=10) == 0


def test_write_demo_escapes_percent_in_paths(tmp_path: Path, dest: Path) -> None:
    # '%' starts a specifier in .vm values: a data directory named with one must survive
    odd = seed_debs(tmp_path / "50%data")
    path = demo.write_demo(tmp_path / "etc", odd)
    assert "50%%data" in path.read_text()
    vm = settings.parse_vm("demo", unitfile.read(path), source_path=path)
    assert vm.kernel is not None and vm.kernel.is_file() and "50%data" in str(vm.kernel)


def test_cloud_demo_is_the_five_line_vm(tmp_path: Path) -> None:
    from qemu_unit.cli import commands as cli
    from qemu_unit.config import source

    base = tmp_path / "debian-12-genericcloud-amd64.qcow2"
    base.write_bytes(b"QFI\xfb" + b"\0" * 100)
    (tmp_path / "home/.ssh").mkdir(parents=True)
    (tmp_path / "home/.ssh/id_rsa.pub").write_text("# mine\nssh-rsa AAAAB3NzaC1yc2E me@host\n")
    key = demo.find_ssh_key(tmp_path / "home")
    assert key == "ssh-rsa AAAAB3NzaC1yc2E me@host"
    path = demo.write_cloud_demo(tmp_path / "etc", base, key)
    vm = settings.load_vm(source.Source("cloud", "vm", path, ()))
    assert (vm.image, vm.ssh_authorized_keys, str(vm.ready)) == (base, (key,), "agent")
    assert [(p.host_ip, p.host_port, p.guest_port) for p in vm.publish_ports] == [
        ("127.0.0.1", 2222, 22)]
    assert vm.wanted_by == ("multi-user.target",)
    assert cli.main(["validate", str(path)]) == 0
    with pytest.raises(QemuUnitError, match="no SSH public key"):
        demo.find_ssh_key(tmp_path / "nobody")
