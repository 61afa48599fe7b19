"""host.py: the host plan, everything learned from the host before anything is acquired."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.config import domainxml
from qemu_unit.config.settings import Accel, Disk, VMConfig, load_vm, parse_vm
from qemu_unit.config.source import Source
from qemu_unit.config.unitfile import UnitFile, parse
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.vm import host
from qemu_unit.vm.host import check_files, detect_format
from tests.test_fixtures import dirs_of

DIRS = dirs_of("web")


def vm_of(text: str, name: str = "web") -> VMConfig:
    return parse_vm(name, UnitFile("/x.vm", tuple(parse(text, "/x.vm"))))


# Disk formats.


def _qcow2(path: Path, *options: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "1M"],
                   check=True)
    return path


def test_detect_format(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    qcow2 = _qcow2(tmp_path / "disk.qcow2")
    assert detect_format(Disk(raw)) == "raw"
    assert detect_format(Disk(qcow2, readonly=True)) == "qcow2"  # read-only: probed
    assert detect_format(Disk(qcow2, format="qcow2")) == "qcow2"
    assert detect_format(Disk(qcow2, format="raw")) == "raw"  # as given, never probed
    assert detect_format(Disk(tmp_path / "missing")) == "raw"
    assert detect_format(Disk(Path("/dev/null"))) == "raw"


def test_a_writable_disk_never_chooses_its_own_format(tmp_path: Path) -> None:
    # What a guest writing a raw disk can plant: a qcow2 header.
    planted = _qcow2(tmp_path / "guest.img")
    vm = vm_of(f"[VM]\nDisk={planted}\n")
    with pytest.raises(ConfigError, match="has no format=: write format=qcow2") as info:
        host.plan(vm, DIRS, accel=Accel.TCG)
    assert (info.value.line, info.value.key) == (2, "Disk")


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    # The review's attack: a header whose data file is a host file QEMU opens read-write.
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 1024 * 1024)
    image = _qcow2(tmp_path / "guest.img", "-o", f"data_file={target},data_file_raw=on")
    for text in (f"Disk={image}", f"Disk={image},format=qcow2", f"Disk={image},readonly"):
        with pytest.raises(ConfigError, match="external data file") as info:
            host.plan(vm_of(f"[VM]\n{text}\n"), DIRS, accel=Accel.TCG)
        assert info.value.key == "Disk"
    base = vm_of(f"[VM]\nImage={image}\n")
    with pytest.raises(ConfigError, match="external data file") as info:
        host.plan(base, DIRS, accel=Accel.TCG)
    assert info.value.key == "Image"


def test_a_qcow2_with_unknown_incompatible_features_is_refused(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "d.qcow2")
    with open(image, "r+b") as f:  # incompatible_features: bit 40, unknown to QEMU 7.2
        f.seek(72)
        f.write((1 << 40).to_bytes(8, "big"))
    with pytest.raises(ConfigError, match=r"unknown incompatible features \(0x10000000000\)"):
        host.plan(vm_of(f"[VM]\nDisk={image},format=qcow2\n"), DIRS, accel=Accel.TCG)
    # Known features (here zstd compression, extended L2) are fine.
    known = _qcow2(tmp_path / "k.qcow2", "-o", "compression_type=zstd,extended_l2=on")
    plan = host.plan(vm_of(f"[VM]\nDisk={known},format=qcow2\n"), DIRS, accel=Accel.TCG)
    assert plan.disks == (host.DiskPlan("qcow2"),)


def test_probed_qcow2_with_a_backing_file_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"\0" * 4096)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)],
        check=True,
    )
    vm = vm_of(f"[VM]\n\nDisk={overlay},readonly\n")
    with pytest.raises(ConfigError, match="backing file: write format=qcow2") as info:
        host.plan(vm, DIRS, accel=Accel.TCG)
    assert (info.value.line, info.value.key) == (3, "Disk")
    explicit = vm_of(f"[VM]\nDisk={overlay},format=qcow2\n")
    assert host.plan(explicit, DIRS, accel=Accel.TCG).disks == (host.DiskPlan("qcow2"),)


def test_each_disk_header_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 512)
    reads: list[Disk] = []
    original = host.detect_format
    monkeypatch.setattr(host, "detect_format", lambda d: reads.append(d) or original(d))
    vm = vm_of(f"[VM]\nDisk={image}\nDisk={image}\n")
    assert host.plan(vm, DIRS, accel=Accel.TCG).disks == (host.DiskPlan("raw"),) * 2
    assert reads == list(vm.disks)


# Files.


def test_check_files_names_the_assignment(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    vm = vm_of(f"[VM]\nCDROM=/dev/null\nCDROM={tmp_path}/dir\n")
    with pytest.raises(ConfigError, match="is a directory") as info:
        check_files(vm)
    assert (info.value.path, info.value.line, info.value.key) == ("/x.vm", 3, "CDROM")


def test_check_files_passes_for_readable_files() -> None:
    check_files(vm_of("[VM]\nKernel=/dev/null\nInitrd=/dev/null\nDisk=/dev/null\n"))


def test_files_of_an_xml_source(tmp_path: Path) -> None:
    xml = tmp_path / "web%.xml"
    xml.write_text("<domain/>")
    dropin = tmp_path / "10.conf"
    dropin.write_text("[VM]\nShutdownTimeout=3s\n")
    vm = load_vm(Source("web", "xml", xml, (dropin,)))
    assert (vm.domain_xml, vm.shutdown_timeout, vm.source_path) == (xml, 3.0, xml)
    timeout = vm.origin("ShutdownTimeout")
    assert vm.origin("DomainXML") is None and timeout is not None
    assert (timeout.path, timeout.line) == (str(dropin), 2)
    check_files(vm)
    xml.unlink()
    with pytest.raises(ConfigError, match="does not exist") as info:
        check_files(vm)
    # The XML file is not an assignment: no line, no key.
    assert (info.value.path, info.value.line, info.value.key) == (str(xml), None, None)


# The accelerator: one decision, /dev/kvm opened once.


class FakeKVM:
    """Stands in for host.kvm_problem: PROBLEM None means /dev/kvm opens. Counts probes."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self.probes = 0

    def __call__(self) -> str | None:
        self.probes += 1
        return self.problem


@pytest.fixture
def kvm(monkeypatch: pytest.MonkeyPatch) -> FakeKVM:
    fake = FakeKVM()
    monkeypatch.setattr(host, "kvm_problem", fake)
    return fake


def test_auto_uses_kvm_where_it_opens(kvm: FakeKVM) -> None:
    assert host.plan(vm_of("[VM]\n"), DIRS).accel is Accel.KVM
    assert kvm.probes == 1


def test_auto_falls_back_to_tcg_and_says_so(
    kvm: FakeKVM, caplog: pytest.LogCaptureFixture
) -> None:
    kvm.problem = "/dev/kvm: Permission denied"
    assert host.plan(vm_of("[VM]\n"), DIRS).accel is Accel.TCG
    assert "falling back to TCG" in caplog.text and "Permission denied" in caplog.text
    assert kvm.probes == 1


def test_kvm_requested_but_unusable_names_the_assignment(kvm: FakeKVM) -> None:
    kvm.problem = "/dev/kvm: No such file or directory"
    with pytest.raises(ConfigError, match="KVM requested but unusable") as info:
        host.plan(vm_of("[VM]\nCPUs=1\nAccel=kvm\n"), DIRS)
    assert (info.value.line, info.value.key) == (3, "Accel")


def test_tcg_and_validate_never_open_dev_kvm(kvm: FakeKVM) -> None:
    assert host.plan(vm_of("[VM]\nAccel=tcg\n"), DIRS).accel is Accel.TCG
    assert host.plan(vm_of("[VM]\n"), DIRS, probe=False).accel is Accel.TCG
    assert host.plan(vm_of("[VM]\nAccel=kvm\n"), DIRS, probe=False).accel is Accel.KVM
    assert kvm.probes == 0


def test_a_full_xml_runs_as_its_domain_type_says(tmp_path: Path, kvm: FakeKVM) -> None:
    path = tmp_path / "web.xml"
    path.write_text("<domain type='kvm'><name>x</name></domain>")
    assert host.plan(vm_of(f"[VM]\nDomainXML={path}\n"), DIRS).accel is Accel.KVM
    assert host.plan(vm_of(f"[VM]\nDomainXML={path}\nAccel=tcg\n"), DIRS).accel is Accel.TCG
    kvm.problem = "/dev/kvm: Permission denied"
    with pytest.raises(ConfigError, match="<domain type='kvm'> but KVM is unusable") as info:
        host.plan(vm_of(f"[VM]\nDomainXML={path}\n"), DIRS)
    assert info.value.path == str(path)
    path.write_text("<domain type='qemu'><name>x</name></domain>")
    assert host.plan(vm_of(f"[VM]\nDomainXML={path}\n"), DIRS).accel is Accel.TCG


def test_a_decided_accelerator_must_fit_the_vm() -> None:
    with pytest.raises(QemuUnitError, match="decided accelerator"):
        host.plan(vm_of("[VM]\n"), DIRS, accel=Accel.AUTO)
    with pytest.raises(QemuUnitError, match="Accel=tcg"):
        host.plan(vm_of("[VM]\nAccel=tcg\n"), DIRS, accel=Accel.KVM)


def test_the_embed_root_must_leave_room_for_the_monitor_socket() -> None:
    long = paths.Dirs(state=Path("/s"), root=Path("/r" * 40), cache=Path("/c"), logs=Path("/l"))
    with pytest.raises(ConfigError, match="too long for QEMU's monitor socket"):
        host.plan(vm_of("[VM]\n"), long, accel=Accel.TCG)


def test_default_dirs_follow_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/qemu-run/web")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/qemu-run/web")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/qemu-run")
    assert paths.finalize_dirs("web") == DIRS


# DomainXML=: read, parsed and its host paths checked once.


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read domain XML"), (b"<domain>", "invalid XML"),
     (b"\xff<domain/>", "not valid UTF-8"), (b"<network/>", "not <domain>")],
)
def test_bad_domain_xml(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.xml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        domainxml.read_domain_xml(path)
    assert info.value.path == str(path)


def test_deeply_nested_xml_is_a_config_error(tmp_path: Path) -> None:
    # ElementTree serialises recursively: 1000 levels were a RecursionError in the runner.
    path = tmp_path / "deep.xml"
    path.write_text("<domain type='qemu'><name>d</name>" + "<a>" * 1000 + "</a>" * 1000
                    + "</domain>")
    with pytest.raises(ConfigError, match="nested deeper than 100 levels") as info:
        host.plan(vm_of(f"[VM]\nDomainXML={path}\n"), DIRS, accel=Accel.TCG)
    assert info.value.path == str(path)
    ok = tmp_path / "ok.xml"
    ok.write_text("<domain type='qemu'>" + "<a>" * 98 + "</a>" * 98 + "</domain>")
    domainxml.read_domain_xml(ok)


def xml_problem(tmp_path: Path, devices: str, os_: str = "") -> str:
    path = tmp_path / "web.xml"
    path.write_text(f"<domain type='qemu'><name>x</name><os><type>hvm</type>{os_}</os>"
                    f"<devices>{devices}</devices></domain>")
    with pytest.raises(ConfigError) as info:
        host.plan(vm_of(f"[VM]\nDomainXML={path}\n"), DIRS, accel=Accel.TCG)
    assert info.value.path == str(path)
    return info.value.message


def test_host_paths_of_a_domain_xml_are_checked(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    missing = tmp_path / "missing"
    assert xml_problem(tmp_path, f"<emulator>{missing}</emulator>") == (
        f"<emulator> names {missing}, which is missing"
    )
    assert xml_problem(tmp_path, f"<emulator>{tmp_path}/file</emulator>") == (
        f"<emulator> names {tmp_path}/file, which is not executable"
    )
    assert xml_problem(
        tmp_path,
        f"<filesystem type='mount'><source dir='{missing}'/><target dir='t'/></filesystem>",
    ) == f"<filesystem> names {missing}, which is missing"
    assert xml_problem(
        tmp_path,
        f"<filesystem type='mount'><source dir='{tmp_path}/file'/><target dir='t'/></filesystem>",
    ) == f"<filesystem> names {tmp_path}/file, which is not a directory"
    assert xml_problem(
        tmp_path, f"<disk type='dir' device='disk'><source dir='{missing}'/></disk>"
    ) == f"<disk> names {missing}, which is missing"
    assert xml_problem(
        tmp_path, f"<disk type='file'><source file='{tmp_path}'/></disk>"
    ) == f"<disk> names {tmp_path}, which is a directory"
    assert "<backingStore> names" in xml_problem(
        tmp_path,
        f"<disk type='file'><source file='{tmp_path}/file'/><backingStore type='file'>"
        f"<source file='{missing}'/></backingStore></disk>",
    )
    assert xml_problem(tmp_path, "", f"<kernel>{missing}</kernel>") == (
        f"<kernel> names {missing}, which is missing"
    )


def test_existing_host_paths_pass(tmp_path: Path) -> None:
    path = tmp_path / "web.xml"
    path.write_text(
        "<domain type='qemu'><name>x</name><os><type>hvm</type><kernel>/dev/null</kernel></os>"
        "<devices><emulator>/bin/true</emulator>"
        f"<filesystem type='mount'><source dir='{tmp_path}'/><target dir='t'/></filesystem>"
        f"<disk type='dir' device='disk'><source dir='{tmp_path}'/></disk></devices></domain>"
    )
    plan = host.plan(vm_of(f"[VM]\nDomainXML={path}\n"), DIRS, accel=Accel.TCG)
    assert plan.domain_xml is not None and plan.domain_xml.findtext("name") == "x"
    kinds = {(p.tag, p.kind) for p in domainxml.xml_paths(plan.domain_xml)}
    assert kinds == {("kernel", "file"), ("emulator", "exec"), ("filesystem", "dir"),
                     ("disk", "dir")}


def test_unprivileged_logs_follow_a_given_state_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # bench/runner.py runs the runner as qemu-run with STATE_DIRECTORY= but no
    # LOGS_DIRECTORY= and no HOME: the logs went to /.local/state/... (EACCES).
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("LOGS_DIRECTORY", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    assert paths.finalize_dirs("web").logs == tmp_path / "state"


def test_by_hand_the_runtime_directory_is_private_never_in_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The review: without $XDG_RUNTIME_DIR the runner used /tmp/qemu-run-UID, which another
    # user had made first with a symlinked lock file; a victim's file was truncated.
    uid = os.geteuid()
    monkeypatch.setattr(paths.os, "geteuid", lambda: uid if uid != 0 else 1000)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with pytest.raises(QemuUnitError, match="no private runtime directory"):
        paths.finalize_dirs("web")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, paths.os.geteuid(), -1)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(mine))
    assert paths.finalize_dirs("web").root == mine / "qemu-run/web"
    mine.chmod(0o777)  # anybody could plant files in it
    with pytest.raises(QemuUnitError, match="not a private directory of this user"):
        paths.finalize_dirs("web")
    mine.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(mine)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(link))
    with pytest.raises(QemuUnitError, match="not a private directory"):
        paths.finalize_dirs("web")
    os.chown(mine, paths.os.geteuid() + 1, -1)  # somebody else's
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(mine))
    with pytest.raises(QemuUnitError, match="not a private directory"):
        paths.finalize_dirs("web")
