"""install.py: the pip path writes what the packages install, under a root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qemu_unit.cli import install

REPO = Path(__file__).resolve().parents[1]


def test_install_and_uninstall_under_a_root(tmp_path: Path) -> None:
    lay = install.install(tmp_path, Path("/usr/local"), reload=False)
    unit = lay.unit.read_text()
    assert lay.unit == tmp_path / "usr/local/lib/systemd/system/qemu-run@.service"
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [f"ExecStart={install.finalize_command()} run %i"]
    caps = lay.caps_unit.read_text()
    assert f"ExecStart={install.finalize_command()} prepare-caps\n" in caps
    assert lay.generator.read_text().startswith(f"#!{sys.executable} -IB\n")
    assert lay.generator.stat().st_mode & 0o111
    assert "u qemu-run" in lay.sysusers.read_text()
    for page in ("man1/qemu-unit.1", "man5/qemu-run.vm.5", "man8/qemu-run@.service.8"):
        assert (lay.mandir / page).is_file(), page
    # No /etc/passwd under the root: the user is left to systemd-sysusers at boot.
    assert not (tmp_path / "etc/passwd").exists()
    install.uninstall(tmp_path, Path("/usr/local"), reload=False)
    left = [p for p in (tmp_path / "usr").rglob("*") if p.is_file()]
    assert left == []


def test_installed_units_verify(tmp_path: Path) -> None:
    lay = install.install(tmp_path, Path("/usr/local"), reload=False)
    assert lay.register_unit.is_file() and "/usr/bin/python3" not in lay.register_unit.read_text()
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(lay.unit.with_name("qemu-run@x.service")),
         str(lay.unit.with_name("qemu-run-register@x.service"))],
        capture_output=True,
        text=True,
        env={"SYSTEMD_UNIT_PATH": f"{lay.unit.parent}:", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    # Offline, verify may complain about the missing user only; never about the units' syntax.
    bad = [line for line in result.stderr.splitlines()
           if "qemu-run@" in line or "qemu-run-register@" in line]
    assert bad == [], result.stderr


def test_world_executable_detects_private_interpreters(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    exe = private / "python"
    exe.write_text("")
    exe.chmod(0o755)
    assert not install.world_executable(exe)
    assert install.world_executable(Path("/usr/bin/python3"))
