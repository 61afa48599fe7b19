"""Backups (vm/backup.py, cli/backup.py) without a running VM: the manifest, its checksums
and chains, and backup/restore of a stopped VM on real qcow2 files with the real qemu-img.
A running VM's backup (the runner's job, checkpoints, incremental points) is in
tests/system/test_backup_system.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.cli import backup as cli_backup
from qemu_unit.cli.commands import main
from qemu_unit.config import settings, source
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import backup
from qemu_unit.vm.backup import Base, DiskCopy, File, Manifest, Point


def _file(path: str) -> File:
    return File(path, 1, "0" * 64)


def _point(pid: str, parent: str | None = None) -> Point:
    return Point(pid, parent, 1.0, "consistent", f"c-{pid}", False, None, _file(f"{pid}/vm"),
                 (DiskCopy("vda", "/x", True, "qcow2", _file(f"{pid}/vda.qcow2")),))


def test_manifest_round_trip_and_chain(tmp_path: Path) -> None:
    points = (_point("20261206-010000"), _point("20261206-020000", "20261206-010000"),
              _point("20261206-030000", "20261206-020000"))
    backup.write_manifest(tmp_path, Manifest("web", points))
    read = backup.read_manifest(tmp_path)
    assert read == Manifest("web", points)
    assert [p.id for p in read.chain(None)] == [p.id for p in points]
    assert [p.id for p in read.chain("20261206-020000")] == [p.id for p in points[:2]]
    with pytest.raises(QemuUnitError, match="no point 'nope'"):
        read.chain("nope")
    assert not list(tmp_path.glob("*.new"))  # replaced whole


def test_manifest_refuses_files_outside_their_point(tmp_path: Path) -> None:
    bad = replace(_point("20261206-010000"), vm=_file("../../etc/passwd"))
    backup.write_manifest(tmp_path, Manifest("web", (bad,)))
    with pytest.raises(backup.CorruptBackup, match="not a file of point"):
        backup.read_manifest(tmp_path)
    backup.manifest_path(tmp_path).write_text("{not json")
    with pytest.raises(backup.CorruptBackup, match="not a backup manifest"):
        backup.read_manifest(tmp_path)
    assert backup.read_manifest(tmp_path / "none") is None


def test_new_id_is_unique_within_a_second() -> None:
    first = backup.new_id(None, 0)
    assert first == "19700101-000000"
    taken = Manifest("web", (_point(first),))
    assert backup.new_id(taken, 0) == "19700101-000000-2"


def test_verify_detects_a_changed_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    data = tmp_path / "p" / "vda.qcow2"
    data.write_bytes(b"x" * 100000)
    good = backup.describe(tmp_path, data)
    point = replace(_point("p"), vm=good, disks=())
    backup.verify(tmp_path, [point])
    with open(data, "r+b") as f:  # same size, one byte differs
        f.seek(5000)
        f.write(b"y")
    with pytest.raises(backup.CorruptBackup, match="does not match its checksum"):
        backup.verify(tmp_path, [point])
    data.unlink()
    with pytest.raises(backup.CorruptBackup, match="missing"):
        backup.verify(tmp_path, [point])


def test_checkpoint_definition_drops_the_domain(tmp_path: Path) -> None:
    xml = ("<domaincheckpoint><name>c1</name><creationTime>5</creationTime><disks>"
           "<disk name='vda' checkpoint='bitmap' bitmap='c1'/></disks>"
           "<domain type='qemu'><name>x</name><uuid>u</uuid></domain></domaincheckpoint>")
    backup.keep_checkpoint(tmp_path, "c1", xml)
    kept = (tmp_path / paths.CHECKPOINTS_DIR / "c1.xml").read_text()
    assert "<domain " not in kept and "<uuid>" not in kept
    assert "bitmap='c1'" in kept.replace('"', "'")
    backup.forget_checkpoint(tmp_path, "c1")
    assert not (tmp_path / paths.CHECKPOINTS_DIR / "c1.xml").exists()


class _Checkpoint:
    def __init__(self, name: str, parent: str | None) -> None:
        self.name, self.parent = name, parent

    def getName(self) -> str:  # noqa: N802 (libvirt's name)
        return self.name

    def getXMLDesc(self, _flags: int) -> str:  # noqa: N802
        parent = f"<parent><name>{self.parent}</name></parent>" if self.parent else ""
        return f"<domaincheckpoint><name>{self.name}</name>{parent}</domaincheckpoint>"


class _Domain:
    def __init__(self, checkpoints: list[_Checkpoint]) -> None:
        self.checkpoints = checkpoints

    def listAllCheckpoints(self, _flags: int) -> list[_Checkpoint]:  # noqa: N802
        return self.checkpoints


def test_saved_checkpoints_follow_libvirt(tmp_path: Path) -> None:
    # c2's kept definition named c1 as its parent; once c1 is deleted it must not.
    backup.save_checkpoints(_Domain([_Checkpoint("c1", None), _Checkpoint("c2", "c1")]),
                            tmp_path)
    backup.save_checkpoints(_Domain([_Checkpoint("c2", None)]), tmp_path)
    kept = sorted(p.name for p in (tmp_path / paths.CHECKPOINTS_DIR).iterdir())
    assert kept == ["c2.xml"]
    assert "<parent>" not in (tmp_path / paths.CHECKPOINTS_DIR / "c2.xml").read_text()


def test_backup_request_xml() -> None:
    xml = backup.backup_xml({"vda": "/b/vda.qcow2"}, "c1")
    assert "<incremental>c1</incremental>" in xml and "mode=\"push\"" in xml
    assert "checkpoint=\"bitmap\"" in backup.checkpoint_xml("c2", ["vda"])


def test_chain_spec_names_every_file_and_the_base(tmp_path: Path) -> None:
    a, b = _point("20261206-010000"), _point("20261206-020000", "20261206-010000")
    spec = cli_backup.chain_spec(tmp_path, [a, b], "vda", Base("/base.qcow2", "qcow2", "s"))
    assert spec["file"]["filename"] == f"{tmp_path}/20261206-020000/vda.qcow2"
    assert spec["backing"]["file"]["filename"] == f"{tmp_path}/20261206-010000/vda.qcow2"
    assert spec["backing"]["backing"]["file"]["filename"] == "/base.qcow2"
    assert cli_backup.chain_spec(tmp_path, [a], "vda", None)["backing"] is None


# -- a stopped VM, end to end through the CLI -----------------------------------------------


def _io(disk: Path, command: str, fmt: str = "qcow2") -> str:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(disk)], check=True,
                          capture_output=True, text=True).stdout


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


@pytest.fixture
def stopped_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               request: pytest.FixtureRequest) -> dict[str, Path]:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    _io(base, "write -P 0x11 0 16M")
    config = tmp_path / "etc"
    config.mkdir()
    (config / "web.vm").write_text(f"[VM]\nImage={base}\nAccel=tcg\n")
    state = tmp_path / "state-web"
    state.mkdir()
    overlay = state / paths.OVERLAY
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(overlay)], check=True)
    _io(overlay, "write -P 0x22 1M 2M")
    run = Path(tempfile.mkdtemp(prefix="qu-", dir="/tmp"))  # short: a socket path limit
    request.addfinalizer(lambda: shutil.rmtree(run, ignore_errors=True))
    for env, value in (("STATE_DIRECTORY", state), ("RUNTIME_DIRECTORY", run)):
        monkeypatch.setenv(env, str(value))
    return {"base": base, "config": config, "state": state, "overlay": overlay,
            "dir": tmp_path / "backups", "tmp": tmp_path}


def _restore_env(monkeypatch: pytest.MonkeyPatch, vm: dict[str, Path], name: str) -> Path:
    state = vm["tmp"] / f"state-{name}"
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    return state


def test_stopped_backup_keeps_the_difference_and_restores(
        stopped_vm: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    vm = stopped_vm
    assert main(["backup", "web", str(vm["dir"]), "--config-dir", str(vm["config"])]) == 0
    assert "full, stopped" in capsys.readouterr().err
    manifest = backup.read_manifest(vm["dir"])
    assert manifest is not None and len(manifest.points) == 1
    point = manifest.points[0]
    assert point.base is not None and point.base.path == str(vm["base"])
    disk = vm["dir"] / point.disks[0].file.path
    # Only the overlay's 2 MiB, not the base's 16 MiB.
    assert disk.stat().st_size < 4 * 2**20
    assert not list(vm["dir"].glob(f".*{paths.BACKUP_PARTIAL_SUFFIX}"))

    state = _restore_env(monkeypatch, vm, "copy")
    name, restored = cli_backup.restore(vm["dir"], "copy", config_dir=vm["config"])
    assert (name, restored.id) == ("copy", point.id)
    assert _same(state / paths.OVERLAY, vm["overlay"])
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(state / paths.OVERLAY)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["backing-filename"] == str(vm["base"])
    assert (vm["config"] / "copy.vm").read_text() == (vm["config"] / "web.vm").read_text()
    # Never over an existing VM.
    with pytest.raises(QemuUnitError, match="exists"):
        cli_backup.restore(vm["dir"], "copy", config_dir=vm["config"])


def test_drop_ins_travel_with_the_backup(stopped_vm: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    vm = stopped_vm
    dropins = vm["config"] / "web.vm.d"
    dropins.mkdir()
    (dropins / "20-cpus.conf").write_text("[VM]\nCPUs=3\n")
    (dropins / "10-memory.conf").write_text("[VM]\nMemory=768M\n")
    assert main(["backup", "web", str(vm["dir"]), "--config-dir", str(vm["config"])]) == 0
    _restore_env(monkeypatch, vm, "copy")
    # Another host: the restored .vm alone carries what the drop-ins said.
    elsewhere = vm["tmp"] / "elsewhere"
    cli_backup.restore(vm["dir"], "copy", config_dir=elsewhere)
    assert not (elsewhere / "copy.vm.d").exists()
    copy = settings.load_vm(source.find_source("copy", [elsewhere]))
    assert (copy.memory >> 20, copy.cpus) == (768, 3)
    assert copy.image == vm["base"]


def test_corrupted_backup_is_refused_and_nothing_written(
        stopped_vm: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    vm = stopped_vm
    cli_backup.run_backup("web", vm["dir"], search_path=[vm["config"]])
    point = backup.read_manifest(vm["dir"]).points[-1]  # type: ignore[union-attr]
    disk = vm["dir"] / point.disks[0].file.path
    with open(disk, "r+b") as f:
        f.seek(disk.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    state = _restore_env(monkeypatch, vm, "bad")
    with pytest.raises(backup.CorruptBackup, match="checksum"):
        cli_backup.restore(vm["dir"], "bad", config_dir=vm["config"])
    assert not (vm["config"] / "bad.vm").exists()
    assert not state.exists()


def test_standalone_backup_needs_no_base(stopped_vm: dict[str, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    vm = stopped_vm
    point = cli_backup.run_backup("web", vm["dir"], standalone=True,
                                  search_path=[vm["config"]])
    assert point.base is None and point.standalone
    vm["base"].rename(vm["tmp"] / "gone.qcow2")  # the other host has no base
    state = _restore_env(monkeypatch, vm, "far")
    cli_backup.restore(vm["dir"], "far", config_dir=vm["config"])
    restored = state / paths.RESTORED_BASE
    assert "read 2097152/2097152 bytes" in _io(restored, "read -P 0x22 1M 2M")
    assert "read 1048576/1048576 bytes" in _io(restored, "read -P 0x11 0 1M")
    assert f"Image={restored}" in (vm["config"] / "far.vm").read_text()


def test_restore_needs_the_same_base(stopped_vm: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    vm = stopped_vm
    cli_backup.run_backup("web", vm["dir"], search_path=[vm["config"]])
    _io(vm["base"], "write -P 0x33 0 64k")
    _restore_env(monkeypatch, vm, "other")
    with pytest.raises(QemuUnitError, match="not the one the backup was taken on"):
        cli_backup.restore(vm["dir"], "other", config_dir=vm["config"])
    vm["base"].unlink()
    with pytest.raises(QemuUnitError, match="--standalone"):
        cli_backup.restore(vm["dir"], "other", config_dir=vm["config"])


def test_stopped_backups_are_full_each_time(stopped_vm: dict[str, Path]) -> None:
    vm = stopped_vm
    first = cli_backup.run_backup("web", vm["dir"], search_path=[vm["config"]])
    second = cli_backup.run_backup("web", vm["dir"], search_path=[vm["config"]])
    assert first.parent is None and second.parent is None and second.id != first.id
    assert len(backup.read_manifest(vm["dir"]).points) == 2  # type: ignore[union-attr]


def test_prune_keeps_what_the_last_points_need() -> None:
    ids = [f"20261206-0{n}0000" for n in range(1, 7)]
    # Two chains: 1 <- 2 <- 3, then 4 <- 5 <- 6.
    points = tuple(_point(i, None if n in (0, 3) else ids[n - 1]) for n, i in enumerate(ids))
    m = Manifest("web", points)
    assert backup.chain_full(Manifest("web", points[:3]), 3)
    assert not backup.chain_full(Manifest("web", points[:2]), 3)
    kept, gone = backup.prune(m, 2)  # 5 and 6 need 4
    assert gone == ids[:3] and [p.id for p in kept.points] == ids[3:]
    kept, gone = backup.prune(m, 4)  # 3 needs 1 and 2: nothing can go
    assert gone == [] and kept == m
    assert backup.prune(m, 0) == (m, [])


def test_stopped_backups_pruned_to_keep(stopped_vm: dict[str, Path]) -> None:
    vm = stopped_vm
    made = [cli_backup.run_backup("web", vm["dir"], keep=2, search_path=[vm["config"]])
            for _ in range(3)]
    left = backup.read_manifest(vm["dir"])
    assert left is not None and [p.id for p in left.points] == [p.id for p in made[1:]]
    assert not (vm["dir"] / made[0].id).exists()


def test_scheduled_backup_uses_backup_to_and_keep(stopped_vm: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    vm = stopped_vm
    to = vm["tmp"] / "scheduled"
    with (vm["config"] / "web.vm").open("a") as f:
        f.write(f"BackupSchedule=daily\nBackupTo={to}\nBackupKeep=2\n")
    argv = ["backup", "--scheduled", "web", "--config-dir", str(vm["config"])]
    for _ in range(3):
        assert main(argv) == 0
    assert f"of web in {to}: full, stopped" in capsys.readouterr().err
    left = backup.read_manifest(to)
    # A stopped VM's points are full: BackupKeep=2 leaves the last two.
    assert left is not None and len(left.points) == 2
    # Another DIR than BackupTo= is refused, not silently used.
    assert main([*argv[:2], "web", str(vm["dir"]), *argv[3:]]) == 1
    assert not vm["dir"].exists()


def test_scheduled_backup_without_backup_to_names_the_key(
        stopped_vm: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    vm = stopped_vm
    argv = ["backup", "--scheduled", "web", "--config-dir", str(vm["config"])]
    assert main(argv) == 78
    err = capsys.readouterr().err
    assert f"{vm['config'] / 'web.vm'}: BackupTo=: VM web has no BackupSchedule=" in err, err
    assert main(["backup", "web", "--config-dir", str(vm["config"])]) == 1
    assert "DIR is needed" in capsys.readouterr().err
