"""caps.seed: the shared capability cache copied into a VM's own, newer files only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qemu_unit.paths import CAPABILITIES
from qemu_unit.vm import caps


def shared_cache(tmp_path: Path, **files: str) -> Path:
    shared = tmp_path / "shared"
    (shared / CAPABILITIES).mkdir(parents=True)
    for name, text in files.items():
        (shared / CAPABILITIES / f"{name}.xml").write_text(text)
    return shared


def test_seed_copies_the_shared_files_into_the_vms_cache(tmp_path: Path) -> None:
    shared = shared_cache(tmp_path, x86_64="<qemuCaps>a</qemuCaps>")
    (shared / CAPABILITIES / "notes.txt").write_text("not a cache file")
    cache = tmp_path / "vm"
    assert caps.seed(cache, shared) == 1
    target = cache / CAPABILITIES
    assert sorted(p.name for p in target.iterdir()) == ["x86_64.xml"]
    assert (target / "x86_64.xml").read_text() == "<qemuCaps>a</qemuCaps>"
    assert target.stat().st_mode & 0o777 == 0o700


def test_seed_leaves_an_up_to_date_copy_and_replaces_a_stale_one(tmp_path: Path) -> None:
    shared = shared_cache(tmp_path, x86_64="old")
    cache = tmp_path / "vm"
    assert caps.seed(cache, shared) == 1
    assert caps.seed(cache, shared) == 0  # the copy is as new as the shared file
    src = shared / CAPABILITIES / "x86_64.xml"
    src.write_text("new")  # qemu-unit-caps.service probed again (QEMU upgraded)
    copy = cache / CAPABILITIES / "x86_64.xml"
    newer = copy.stat().st_mtime_ns + 1_000_000_000
    os.utime(src, ns=(newer, newer))
    assert caps.seed(cache, shared) == 1
    assert copy.read_text() == "new"
    assert not list((cache / CAPABILITIES).glob(".*.tmp"))


def test_seed_without_a_shared_cache_leaves_the_probe_to_libvirt(tmp_path: Path) -> None:
    cache = tmp_path / "vm"
    assert caps.seed(cache, tmp_path / "missing") == 0
    assert not cache.exists()
    assert caps.seed(tmp_path, tmp_path) == 0  # the service's own cache is the shared one


def test_a_file_that_cannot_be_copied_is_a_warning_not_a_failed_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = shared_cache(tmp_path, x86_64="a")
    (shared / CAPABILITIES / "aarch64.xml").mkdir()  # unreadable as a file, even by root
    cache = tmp_path / "vm"
    assert caps.seed(cache, shared) == 1
    assert "Cannot copy the shared capability cache" in caplog.text
    assert "aarch64.xml: Is a directory" in caplog.text
    assert sorted(p.name for p in (cache / CAPABILITIES).iterdir()) == ["x86_64.xml"]
