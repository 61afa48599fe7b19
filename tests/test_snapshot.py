"""Snapshots of a stopped VM (vm/snapshot.py) on real qcow2 files with the real qemu-img:
every writable disk and the NVRAM, never half a snapshot, pruning only auto- ones."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import snapshot


def qcow2(path: Path, size: str = "4M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def write_io(disk: Path, offset: int, pattern: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 64k",
                    str(disk)], check=True, capture_output=True)


def reads(disk: Path, offset: int, pattern: int) -> bool:
    proc = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} {offset} 64k",
                           str(disk)], capture_output=True, text=True, check=True)
    return "Pattern verification failed" not in proc.stdout


def domain(disks: list[Path], nvram: Path | None = None, raw: Path | None = None,
           readonly: Path | None = None) -> str:
    xml = "<domain><os>"
    xml += f"<nvram>{nvram}</nvram>" if nvram else ""
    xml += "</os><devices>"
    for d in disks:
        xml += (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                f"<source file='{d}'/></disk>")
    if readonly:
        xml += (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file='{readonly}'/><readonly/></disk>")
    if raw:
        xml += (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file='{raw}'/></disk>")
    return xml + "</devices></domain>"


@pytest.fixture
def vm(tmp_path: Path) -> tuple[Path, str, list[Path], Path]:
    state = tmp_path / "state"
    state.mkdir()
    disks = [qcow2(state / "image.qcow2"), qcow2(tmp_path / "data.qcow2")]
    nvram = state / "web_VARS.fd"
    nvram.write_bytes(b"vars-1" * 100)
    ro = tmp_path / "seed.iso"
    ro.write_bytes(b"\0" * 4096)
    return state, domain(disks, nvram, readonly=ro), disks, nvram


def test_create_then_revert_brings_disks_and_nvram_back(vm: tuple[Path, str, list[Path], Path]
                                                        ) -> None:
    state, xml, disks, nvram = vm
    tpm = paths.tpm_state_dir(state)
    (tpm / "tpm2").mkdir(parents=True)
    (tpm / "tpm2" / "tpm2-00.permall").write_bytes(b"tpm-1")
    for d in disks:
        write_io(d, 0, 0x11)
    made = snapshot.create(state, xml, "before")
    assert made.consistency == "stopped" and made.nvram and made.tpm
    assert made.disks == tuple(map(str, disks))  # the read-only disk is not held
    for d in disks:
        write_io(d, 0, 0x22)
        assert snapshot.internal_names(d) == ["before"]
    nvram.write_bytes(b"vars-2")
    (tpm / "tpm2" / "tpm2-00.permall").write_bytes(b"tpm-2")
    (tpm / "tpm2" / "later").write_bytes(b"x")
    assert [s.name for s in snapshot.read_all(state)] == ["before"]
    assert snapshot.read_all(state)[0].tpm
    assert snapshot.revert(state, xml, "before")[1] == []
    assert all(reads(d, 0, 0x11) for d in disks)
    assert nvram.read_bytes() == b"vars-1" * 100
    # The TPM's state as it was: sealed secrets unseal again, later files are gone.
    assert sorted(p.name for p in (tpm / "tpm2").iterdir()) == ["tpm2-00.permall"]
    assert (tpm / "tpm2" / "tpm2-00.permall").read_bytes() == b"tpm-1"


def test_failed_snapshot_leaves_nothing(vm: tuple[Path, str, list[Path], Path]) -> None:
    state, xml, disks, _nvram = vm
    # The second disk already holds the name: refused before anything is made.
    subprocess.run(["qemu-img", "snapshot", "-c", "clash", str(disks[1])], check=True)
    with pytest.raises(QemuUnitError, match="already holds an internal snapshot 'clash'"):
        snapshot.create(state, xml, "clash")
    assert snapshot.internal_names(disks[0]) == []

    class FullDisk(snapshot.Offline):
        def create(self, disk: Path, snap: str) -> None:
            if disk == disks[1]:
                raise QemuUnitError("qemu-img snapshot failed: No space left on device")
            super().create(disk, snap)

    # The second disk fails: the first disk's new snapshot is undone, no directory stays.
    with pytest.raises(QemuUnitError, match="No space left on device"):
        snapshot.create(state, xml, "half", FullDisk())
    assert snapshot.internal_names(disks[0]) == []
    assert snapshot.read_all(state) == []
    assert not any((state / "snapshots").iterdir())


def test_a_raw_writable_disk_is_refused_with_one_line(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(QemuUnitError, match=r"snapshots need qcow2 disks: .*disk.raw is raw"):
        snapshot.create(tmp_path, domain([], raw=raw), "x")


def test_delete_and_prune_only_auto_snapshots(vm: tuple[Path, str, list[Path], Path]) -> None:
    state, xml, disks, _nvram = vm
    for name in ("mine", "auto-1", "auto-2", "auto-3"):
        snapshot.create(state, xml, name)
    assert snapshot.prune(state, xml, 2) == ["auto-1"]
    assert [s.name for s in snapshot.read_all(state)] == ["mine", "auto-2", "auto-3"]
    snapshot.delete(state, xml, "mine")
    assert snapshot.internal_names(disks[0]) == ["auto-2", "auto-3"]
    with pytest.raises(QemuUnitError, match="no snapshot 'mine'"):
        snapshot.revert(state, xml, "mine")


@pytest.mark.parametrize("name", ["", ".x", "-x", "a/b", "a b", "x" * 65])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(QemuUnitError, match="invalid snapshot name"):
        snapshot.check_name(name)


def test_revert_drops_backup_checkpoints(vm: tuple[Path, str, list[Path], Path]) -> None:
    state, xml, disks, _nvram = vm
    for d in disks:
        write_io(d, 0, 0x11)
    snapshot.create(state, xml, "before")
    # What a backup leaves: a persistent bitmap per disk and the checkpoint's definition.
    for d in disks:
        subprocess.run(["qemu-img", "bitmap", "--add", str(d), "cp1"], check=True)
        write_io(d, 0, 0x22)
    (state / paths.CHECKPOINTS_DIR).mkdir()
    (state / paths.CHECKPOINTS_DIR / "cp1.xml").write_text("<domaincheckpoint/>")
    # qcow2 refuses to apply a snapshot over active dirty bitmaps: the revert removes them.
    _found, dropped = snapshot.revert(state, xml, "before")
    assert dropped == ["cp1"]
    assert all(reads(d, 0, 0x11) for d in disks)
    assert all(snapshot.bitmaps(d) == [] for d in disks)
    assert not (state / paths.CHECKPOINTS_DIR).exists()
