"""The saved state's checks (vm/saved.py), without libvirt: what is restored, what refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from qemu_unit import paths
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.vm import saved

XML = "<domain><name>web</name></domain>"
BASE = {"path": "/srv/base.qcow2", "size": 1, "mtime_ns": 2, "inode": 3}
HINT = "run 'qemu-unit discard-save web' to drop it and boot afresh"


class FakeDomain:
    """saveFlags writes the file as libvirt would, or fails as a full disk does."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data

    def saveFlags(self, path: str, dxml: Any, flags: int) -> None:  # noqa: N802
        import libvirt

        if self.data is None:
            raise libvirt.libvirtError("operation failed: No space left on device")
        Path(path).write_bytes(self.data)


def make(state: Path, data: bytes = b"memory" * 1000) -> saved.SavedState:
    return saved.save(FakeDomain(data), state, XML, BASE)


def test_save_then_check_gives_it_back(tmp_path: Path) -> None:
    made = make(tmp_path)
    assert made.size == 6000 and made.memory.read_bytes() == b"memory" * 1000
    assert not (tmp_path / saved.SAVING).exists()
    # meta.json stays padded to its fixed size (rewritten in place).
    assert (made.dir / saved.META).stat().st_size == saved.META_SIZE
    assert json.loads((made.dir / saved.META).read_text())["xml_sha256"] == saved.xml_digest(XML)
    found = saved.check("web", tmp_path, XML, BASE, pytest.fail)
    assert found == made


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(QemuUnitError, match="saving the VM failed: operation failed: No space"):
        saved.save(FakeDomain(None), tmp_path, XML, BASE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("xml", "base", "why"), [
    (XML.replace("web", "web2"), BASE, "its domain changed since the save"),
    (XML, {**BASE, "inode": 4}, "its base image changed since the save"),
    (XML, None, "its base image changed since the save"),
])
def test_a_save_that_no_longer_fits_is_refused_and_kept(
        tmp_path: Path, xml: str, base: dict[str, Any] | None, why: str) -> None:
    make(tmp_path)
    with pytest.raises(ConfigError) as e:
        saved.check("web", tmp_path, xml, base, pytest.fail)
    assert str(e.value) == (f"{tmp_path}/saved: the saved state no longer fits VM web: "
                            f"{why}; {HINT}")
    assert e.value.exit_status == 78
    assert (tmp_path / "saved" / "memory").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_save_is_refused_by_its_checksum(tmp_path: Path, damage: str) -> None:
    made = make(tmp_path)
    data = bytearray(made.memory.read_bytes())
    if damage == "flip":
        data[100] ^= 1
    else:
        del data[-1]
    made.memory.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"corrupt \(checksum mismatch\); run 'qemu-unit"):
        saved.check("web", tmp_path, XML, BASE, pytest.fail)


def test_incomplete_save_is_removed_with_one_line(tmp_path: Path) -> None:
    (tmp_path / saved.SAVING).mkdir()
    (tmp_path / saved.SAVING / "memory").write_bytes(b"half")
    lines: list[str] = []
    assert saved.check("web", tmp_path, XML, BASE, lines.append) is None
    assert len(lines) == 1 and "incomplete saved state" in lines[0]
    assert not (tmp_path / saved.SAVING).exists()


def test_unreadable_meta_is_refused(tmp_path: Path) -> None:
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "meta.json").write_text("{")
    with pytest.raises(ConfigError, match="meta.json: unreadable .*discard-save web"):
        saved.check("web", tmp_path, XML, BASE, pytest.fail)


def test_discard_removes_complete_and_partial(tmp_path: Path) -> None:
    make(tmp_path)
    (tmp_path / saved.SAVING).mkdir()
    assert saved.discard(tmp_path) == [tmp_path / "saved", tmp_path / saved.SAVING]
    assert saved.discard(tmp_path) == []


def test_stop_note_left_for_the_runner_never_through_a_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """note-stop runs as root in a directory the VM's user owns: a link planted at the
    note's name is replaced, its target untouched."""
    from qemu_unit import command

    asked: list[list[str]] = []

    def fake_run(cmd: list[str], what: str, **kw: Any) -> str:
        asked.append(cmd)
        return "stopping\n"

    monkeypatch.setattr(command, "run", fake_run)
    root = tmp_path / "web"
    root.mkdir()
    assert saved.stop_note(root).startswith("unknown (no note")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (root / saved.STOP_NOTE).symlink_to(victim)
    assert saved.note_stop("web", roots=tmp_path) == 0
    assert asked == [["systemctl", "show", "--property=SystemState", "--value"]]
    assert victim.read_text() == "untouched"
    assert not (root / saved.STOP_NOTE).is_symlink()
    assert saved.stop_note(root) == "stopping"
    # The runner already gone with its runtime directory: nothing to tell, no failure.
    assert saved.note_stop("gone", roots=tmp_path) == 0


@pytest.mark.parametrize("user", [False, True])
def test_save_by_hand_returns_once_the_unit_has_stopped(
        monkeypatch: pytest.MonkeyPatch, user: bool) -> None:
    """The runner has exited, systemd has not noticed yet: `qemu-unit save` waits, else a
    `systemctl start` right after it finds the unit active and does nothing."""
    import time

    from qemu_unit import command
    from qemu_unit.cli import commands

    states = ["active", "active", "deactivating", "inactive", "active"]
    asked: list[list[str]] = []

    def show(cmd: list[str], what: str, **_kw: Any) -> str:
        asked.append(cmd)
        return states.pop(0) + "\n"

    monkeypatch.setattr(command, "run", show)
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    commands._wait_unit_stopped("web", user, time.monotonic() + 60)
    assert states == ["active"]  # asked until inactive, not beyond
    assert asked[0] == ["systemctl", *(["--user"] if user else []), "show",
                        "--property=ActiveState", "--value", "qemu-run@web.service"]


def test_save_by_hand_without_systemd_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from qemu_unit import command
    from qemu_unit.cli import commands

    def show(cmd: list[str], what: str, **_kw: Any) -> str:
        raise command.CommandError("asking systemd: systemctl failed (1): no systemd")

    monkeypatch.setattr(command, "run", show)
    began = time.monotonic()
    commands._wait_unit_stopped("web", False, began + 60)
    assert time.monotonic() - began < 5


def test_the_stop_note_step_runs_only_for_host_shutdown_save() -> None:
    from qemu_unit.config import settings, unitfile
    from qemu_unit.generator import convert

    # Not in the template: a step there costs every VM's stop a process (bench/runner.py).
    template = (Path(__file__).parents[1] / "units" / paths.TEMPLATE_UNIT).read_text()
    assert not [line for line in template.splitlines() if line.startswith("ExecStop=")]

    def steps(text: str) -> list[tuple[str, str]]:
        entries = tuple(unitfile.parse(text, "/etc/qemu-run/web.vm"))
        vm = settings.parse_vm("web", unitfile.UnitFile("/etc/qemu-run/web.vm", entries))
        return [(k, v) for k, v in convert.implied_service(vm, convert.host_needs(vm))
                if k == "ExecStop" or v.startswith(paths.HOST_SHUTDOWN_ENV)]

    assert steps("[VM]\nHostShutdown=save\n") == [
        ("Environment", f"{paths.HOST_SHUTDOWN_ENV}=save"),
        ("ExecStop", f"-+{sys.executable} -I -m qemu_unit note-stop %i"),
    ]
    assert steps("[VM]\n") == []
