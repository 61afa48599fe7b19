"""source.py: finding NAME.vm / NAME.xml and drop-ins in the search path, systemd-style."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qemu_unit.config.source import DEFAULT_PATH, Source, find_source, list_sources, search_path
from qemu_unit.errors import ConfigError


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    out = [tmp_path / "etc", tmp_path / "run", tmp_path / "lib"]
    for d in out:
        d.mkdir()
    return out


def write(path: Path, text: str = "[VM]\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def mask(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.devnull)
    return path


def test_search_path_default_env_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMU_RUN_PATH", raising=False)
    assert search_path() == DEFAULT_PATH
    assert [str(p) for p in DEFAULT_PATH] == [
        "/etc/qemu-run", "/run/qemu-run", "/usr/local/lib/qemu-run", "/usr/lib/qemu-run"
    ]
    monkeypatch.setenv("QEMU_RUN_PATH", "/a::/b")
    assert search_path() == (Path("/a"), Path("/b"))
    assert search_path(["/c"]) == (Path("/c"),)


def test_env_path_is_used_by_find_source(
    dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(dirs[1] / "web.vm")
    monkeypatch.setenv("QEMU_RUN_PATH", ":".join(map(str, dirs)))
    assert find_source("web").path == dirs[1] / "web.vm"


def test_first_directory_wins(dirs: list[Path]) -> None:
    write(dirs[2] / "web.vm")
    write(dirs[1] / "web.vm")
    assert find_source("web", dirs) == Source("web", "vm", dirs[1] / "web.vm", ())


def test_vm_before_xml_in_one_directory_xml_in_an_earlier_one_wins(dirs: list[Path]) -> None:
    write(dirs[1] / "web.xml", "<domain/>")
    write(dirs[1] / "web.vm")
    assert find_source("web", dirs).kind == "vm"
    write(dirs[0] / "web.xml", "<domain/>")
    found = find_source("web", dirs)
    assert (found.kind, found.path) == ("xml", dirs[0] / "web.xml")


def test_directories_named_like_files_are_ignored(dirs: list[Path]) -> None:
    (dirs[0] / "web.vm").mkdir()
    write(dirs[1] / "web.vm")
    assert find_source("web", dirs).path == dirs[1] / "web.vm"


def test_not_found_names_the_search_path(dirs: list[Path]) -> None:
    with pytest.raises(ConfigError) as info:
        find_source("web", dirs)
    assert "no web.vm or web.xml" in str(info.value)
    assert ":".join(map(str, dirs)) in str(info.value)


def test_bad_names_are_refused_before_any_lookup(dirs: list[Path]) -> None:
    with pytest.raises(ConfigError, match="'/'"):
        find_source("../etc/passwd", dirs)


def test_dev_null_symlink_masks_a_vm(dirs: list[Path]) -> None:
    write(dirs[2] / "web.vm")
    mask(dirs[0] / "web.vm")
    with pytest.raises(ConfigError, match="masked") as info:
        find_source("web", dirs)
    assert info.value.path == str(dirs[0] / "web.vm")


def test_masking_in_a_later_directory_does_nothing(dirs: list[Path]) -> None:
    write(dirs[0] / "web.vm")
    mask(dirs[2] / "web.vm")
    assert find_source("web", dirs).path == dirs[0] / "web.vm"


def test_dropins_merge_by_file_name_across_directories(dirs: list[Path]) -> None:
    write(dirs[0] / "web.vm")
    a_lib = write(dirs[2] / "web.vm.d" / "a.conf")
    b_etc = write(dirs[0] / "web.vm.d" / "b.conf")
    write(dirs[2] / "web.vm.d" / "b.conf")  # masked by /etc's b.conf
    c_run = write(dirs[1] / "web.vm.d" / "c.conf")
    write(dirs[1] / "web.vm.d" / "notes.txt")  # not a .conf
    assert find_source("web", dirs).dropins == (a_lib, b_etc, c_run)


def test_dev_null_dropin_masks_the_same_name_later(dirs: list[Path]) -> None:
    write(dirs[0] / "web.vm")
    mask(dirs[0] / "web.vm.d" / "10-vendor.conf")
    write(dirs[2] / "web.vm.d" / "10-vendor.conf")
    keep = write(dirs[2] / "web.vm.d" / "20-keep.conf")
    assert find_source("web", dirs).dropins == (keep,)


def test_dropins_apply_to_an_xml_source(dirs: list[Path]) -> None:
    write(dirs[0] / "web.xml", "<domain/>")
    dropin = write(dirs[1] / "web.vm.d" / "t.conf")
    assert find_source("web", dirs).dropins == (dropin,)


def test_template_instance_falls_back_to_the_template(dirs: list[Path]) -> None:
    template = write(dirs[2] / "tmpl@.vm")
    found = find_source("tmpl@blue", dirs)
    assert found == Source("tmpl@blue", "vm", template, ())


def test_instance_file_beats_the_template_in_any_directory(dirs: list[Path]) -> None:
    write(dirs[0] / "tmpl@.vm")
    own = write(dirs[2] / "tmpl@blue.vm")
    found = find_source("tmpl@blue", dirs)
    assert (found.name, found.path) == ("tmpl@blue", own)


def test_template_and_instance_dropins_both_apply(dirs: list[Path]) -> None:
    write(dirs[0] / "tmpl@.vm")
    shared = write(dirs[0] / "tmpl@.vm.d" / "a.conf")
    same_template = write(dirs[0] / "tmpl@.vm.d" / "b.conf")
    own = write(dirs[0] / "tmpl@blue.vm.d" / "b.conf")  # the instance's wins over the template's
    write(dirs[1] / "tmpl@red.vm.d" / "c.conf")  # another instance's
    found = find_source("tmpl@blue", dirs)
    assert found.dropins == (shared, own)
    assert same_template not in found.dropins


def test_a_template_itself_cannot_be_run(dirs: list[Path]) -> None:
    write(dirs[0] / "tmpl@.vm")
    with pytest.raises(ConfigError, match="is a template"):
        find_source("tmpl@", dirs)


def test_masked_instance_even_with_a_template(dirs: list[Path]) -> None:
    write(dirs[0] / "tmpl@.vm")
    mask(dirs[1] / "tmpl@blue.vm")
    with pytest.raises(ConfigError, match="masked"):
        find_source("tmpl@blue", dirs)


def test_list_sources(dirs: list[Path]) -> None:
    write(dirs[0] / "web.vm")
    write(dirs[2] / "web.vm")
    write(dirs[1] / "db.xml", "<domain/>")
    write(dirs[1] / "tmpl@.vm")
    write(dirs[2] / "gone.vm")
    mask(dirs[0] / "gone.vm")
    write(dirs[0] / "readme.txt")
    write(dirs[0] / "web.xml.golden")
    dropin = write(dirs[0] / "web.vm.d" / "x.conf")
    sources = list_sources(dirs)
    assert [(s.name, s.kind, s.path) for s in sources] == [
        ("db", "xml", dirs[1] / "db.xml"),
        ("web", "vm", dirs[0] / "web.vm"),
    ]
    assert sources[1].dropins == (dropin,)


def test_list_sources_reports_bad_names_and_keeps_going(dirs: list[Path]) -> None:
    write(dirs[0] / "bad name.vm")
    write(dirs[0] / ".hidden.vm")
    write(dirs[1] / "good.vm")
    errors: list[ConfigError] = []
    assert [s.name for s in list_sources(dirs, errors=errors)] == ["good"]
    assert sorted(e.path or "" for e in errors) == sorted(
        [str(dirs[0] / ".hidden.vm"), str(dirs[0] / "bad name.vm")]
    )
    assert list_sources(dirs) == list_sources(dirs, errors=[])


def test_missing_directories_are_fine(tmp_path: Path) -> None:
    assert list_sources([tmp_path / "nope"]) == []
