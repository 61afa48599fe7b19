"""TPM=, Share=, SecureBoot= without a VM: host checks, reset, the companion units."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.generator import convert as generator
from qemu_unit.vm import host, image
from tests.test_cloud import vm_of


def test_a_missing_share_directory_is_one_line_naming_file_line_and_key(tmp_path: Path) -> None:
    vm = vm_of(f"[VM]\nShare={tmp_path}:ok\nShare={tmp_path}/gone:data\n")
    with pytest.raises(ConfigError) as e:
        host.check_devices(vm)
    assert str(e.value) == f"/etc/qemu-run/web.vm:3: Share=: {tmp_path}/gone does not exist"
    (tmp_path / "gone").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        host.check_devices(vm)


def test_tpm_without_swtpm_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = vm_of("[VM]\nTPM=yes\n")
    host.check_devices(vm)  # installed here (setup.sh)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="swtpm and swtpm_setup not found: install the "
                                          "Debian packages swtpm and swtpm-tools"):
        host.check_devices(vm)


def test_the_runner_says_which_unit_starts_a_share_daemon(tmp_path: Path) -> None:
    vm = vm_of(f"[VM]\nShare={tmp_path}:data\n")
    with pytest.raises(QemuUnitError, match=r"no virtiofsd listens at "
                       r"/run/qemu-run-virtiofsd/web/data/sock.*qemu-run-virtiofsd@web:data"):
        host.check_share_daemons(vm)


def test_reset_removes_the_tpm_state(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "root"
    tpm = paths.tpm_state_dir(state) / "uuid" / "tpm2"
    tpm.mkdir(parents=True)
    (tpm / "tpm2-00.permall").write_text("x")
    (state / "lib" / "qemu").mkdir()
    root.mkdir()
    assert image.reset("web", state, root) == [state / "lib" / "swtpm"]
    assert [p.name for p in (state / "lib").iterdir()] == ["qemu"]


def test_companion_unit_confines_virtiofsd_and_binds_it_to_the_vm() -> None:
    vm = vm_of("[VM]\nShare=/home/alice/docs:docs:ro\nShare=/tmp/scratch:scratch\n")
    files = dict(generator.convert(vm).files)
    ro = files["qemu-run-virtiofsd@web:docs.service"]
    for line in ("BindsTo=qemu-run@web.service", "PartOf=qemu-run@web.service",
                 "Before=qemu-run@web.service", "ReadOnlyPaths=/home/alice/docs",
                 "ProtectHome=read-only", "PrivateNetwork=yes", "IPAddressDeny=any",
                 "RestrictAddressFamilies=AF_UNIX", "ProtectSystem=strict",
                 "Group=qemu-run", "RuntimeDirectoryMode=0750",
                 "RuntimeDirectory=qemu-run-virtiofsd/web/docs"):
        assert line in ro.splitlines(), line
    assert "-o source=/home/alice/docs -o sandbox=namespace" in ro
    rw = files["qemu-run-virtiofsd@web:scratch.service"]
    assert "ReadWritePaths=/tmp/scratch" in rw.splitlines()
    assert "PrivateTmp=no" in rw.splitlines()
    dropin = files["qemu-run@web.service.d/50-qemu-unit.conf"].splitlines()
    for unit in ("qemu-run-virtiofsd@web:docs.service", "qemu-run-virtiofsd@web:scratch.service"):
        assert f"Requires={unit}" in dropin and f"After={unit}" in dropin


def test_a_colon_in_the_vm_name_is_escaped_in_the_runtime_directory() -> None:
    vm = vm_of("[VM]\nShare=/srv/a:a\n", name="web:1", path="/etc/qemu-run/web:1.vm")
    files = dict(generator.convert(vm).files)
    assert "RuntimeDirectory=qemu-run-virtiofsd/web\\:1/a" in (
        files["qemu-run-virtiofsd@web:1:a.service"].splitlines())


def test_a_seed_mounts_each_share_at_mnt_tag() -> None:
    import json

    from qemu_unit.vm import seed

    vm = vm_of("[VM]\nHostname=web\nShare=/srv/a:data\nShare=/srv/b:isos:ro\n")
    vendor = seed.from_vm(vm).files()["vendor-data"].decode()
    header, _, body = vendor.partition("\n")
    assert header == "#cloud-config"
    commands = json.loads(body)["bootcmd"]
    assert len(commands) == 2
    assert "data /mnt/data virtiofs defaults,nofail 0 0" in commands[0]
    assert "isos /mnt/isos virtiofs ro,defaults,nofail 0 0" in commands[1]
    assert "mount /mnt/isos" in commands[1]
    assert "vendor-data" not in seed.from_vm(vm_of("[VM]\nHostname=web\n")).files()


def test_share_mount_moves_a_share_and_is_checked() -> None:
    import json

    from qemu_unit.vm import seed

    vm = vm_of("[VM]\nHostname=web\nShare=/srv/a:data\nShare=/srv/b:isos:ro\n"
               "ShareMount=isos:/srv/iso-images\n")
    assert [s.mount_point for s in vm.shares] == ["/mnt/data", "/srv/iso-images"]
    commands = json.loads(seed.from_vm(vm).files()["vendor-data"].decode().partition("\n")[2])
    assert "isos /srv/iso-images virtiofs ro,defaults,nofail 0 0" in commands["bootcmd"][1]
    assert "mount /srv/iso-images" in commands["bootcmd"][1]
    for text, message in (
        ("ShareMount=other:/x", "no Share= has that tag"),
        ("ShareMount=data:/x\nShareMount=data:/y", "already has a mount point"),
        ("ShareMount=data:/x\nShareMount=isos:/x", "mount point /x is already used"),
        ("ShareMount=data:relative", "invalid mount point"),
        ("ShareMount=data:/a/../etc", "invalid mount point"),
        ("ShareMount=data:/a b", "invalid mount point"),
        ("ShareMount=data:/a';reboot;'", "invalid mount point"),
        ("ShareMount=/x", "expected TAG:/PATH"),
    ):
        with pytest.raises(ConfigError, match=message):
            vm_of(f"[VM]\nShare=/srv/a:data\nShare=/srv/b:isos\n{text}\n")
