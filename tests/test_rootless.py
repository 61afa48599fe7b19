"""Rootless VMs without a VM: the user search path, what is refused, the user generator,
the user template as installed. (Under a real user manager: tests/system/test_rootless_system.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qemu_unit.cli import commands, install
from qemu_unit.config import rootless, settings, source
from qemu_unit.errors import ConfigError
from qemu_unit.generator import convert as generator
from tests.test_generator import run_generator, tree


def load(tmp_path: Path, text: str, name: str = "web") -> settings.VMConfig:
    path = tmp_path / f"{name}.vm"
    path.write_text(text)
    return settings.load_vm(source.from_file(path))


def test_user_search_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(source.PATH_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    uid = os.getuid()
    assert source.search_path(user=True) == (
        tmp_path / ".config/qemu-run", Path(f"/etc/qemu-run/users/{uid}"),
        Path("/etc/qemu-run/users"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert source.search_path(user=True)[0] == tmp_path / "cfg/qemu-run"
    # Not absolute: ignored, as the XDG base directory specification says.
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative")
    assert source.search_path(user=True)[0] == tmp_path / ".config/qemu-run"
    assert source.search_path() == source.DEFAULT_PATH
    monkeypatch.setenv(source.PATH_ENV, "/a:/b")
    assert source.search_path(user=True) == (Path("/a"), Path("/b"))


def test_what_needs_root_is_refused_one_line_each(tmp_path: Path) -> None:
    vm = load(tmp_path, "[VM]\nNetwork=user\nNetwork=tap:tap0\nNetwork=bridge:br0\n"
                        "Disk=/dev/sdb,format=raw\nDisk=/srv/a.img,format=raw\n")
    problems = [str(p) for p in rootless.refusals(vm)]
    where = f"{tmp_path}/web.vm"
    assert problems == [
        f"{where}:3: Network=: not in a user's VM: tap:tap0 needs root (a tap device or "
        "qemu-bridge-helper); a user's VM has Network=user",
        f"{where}:4: Network=: not in a user's VM: bridge:br0 needs root (a tap device or "
        "qemu-bridge-helper); a user's VM has Network=user",
        f"{where}:5: Disk=: not in a user's VM: /dev/sdb is a host device: a system VM's "
        "(/etc/qemu-run), not a user's",
    ]
    assert all(p.exit_status == 78 for p in rootless.refusals(vm))
    url = load(tmp_path, "[VM]\nImage=https://example.org/d.qcow2\nImageVerify=no\n")
    assert [str(p) for p in rootless.refusals(url)] == [
        f"{where}:2: Image=: not in a user's VM: a URL is pulled by the system's "
        "qemu-run-pull@ unit into the shared cache; a user's VM names a local image "
        "(qemu-unit image pull, then its path)"]
    # The same file is fine for the system, and a plain VM is fine for a user.
    assert rootless.refusals(load(tmp_path, "[VM]\nMemory=1G\n")) == []
    assert rootless.refusals(load(tmp_path, "[VM]\nNetwork=none\n")) == []


def test_convert_for_a_user_manager(tmp_path: Path) -> None:
    vm = load(tmp_path, "[VM]\nNetwork=user\nDisk=/home/alice/d.img,format=raw\n"
                        "[Service]\nNice=5\n[Install]\nWantedBy=multi-user.target\n"
                        "RequiredBy=foo.target\n")
    system = generator.convert(vm)
    user = generator.convert(vm, template=generator.USER_FALLBACK_TEMPLATE, user=True)
    # The user template has no namespace sandbox to relax: no PrivateNetwork=, no paths.
    dropin = user.files[0][1]
    assert "PrivateNetwork" not in dropin and "ReadWritePaths" not in dropin
    assert "ProtectHome" not in dropin and "TimeoutStopSec=70\n" in dropin
    assert "Nice=5\n" in dropin
    assert "PrivateNetwork=no" in system.files[0][1]
    assert user.symlinks == (
        ("default.target.wants/qemu-run@web.service", "/usr/lib/systemd/user/qemu-run@.service"),
        ("foo.target.requires/qemu-run@web.service", "/usr/lib/systemd/user/qemu-run@.service"),
    )
    with pytest.raises(ConfigError, match="tap:t0 needs root"):
        generator.convert(load(tmp_path, "[VM]\nNetwork=tap:t0\n"), user=True)


def test_user_generator_as_the_user_manager_runs_it(tmp_path: Path) -> None:
    config = tmp_path / "home/.config/qemu-run"
    config.mkdir(parents=True)
    (config / "web.vm").write_text("[VM]\nMemory=1G\n[Install]\nWantedBy=multi-user.target\n")
    (config / "tapped.vm").write_text("[VM]\nNetwork=tap:tap0\n")
    out = tmp_path / "out"
    out.mkdir()
    result = run_generator([], out, env={
        "QEMU_RUN_PATH": "", "HOME": str(tmp_path / "home"), "SYSTEMD_SCOPE": "user"})
    assert result.returncode == 1
    assert result.stderr == (f"qemu-unit-generator: {config}/tapped.vm:2: Network=: not in a "
                             "user's VM: tap:tap0 needs root (a tap device or "
                             "qemu-bridge-helper); a user's VM has Network=user (skipped)\n")
    files = tree(out)
    assert set(files) == {"qemu-run@web.service.d/50-qemu-unit.conf",
                          "default.target.wants/qemu-run@web.service"}
    assert files["default.target.wants/qemu-run@web.service"] == \
        "-> /usr/lib/systemd/user/qemu-run@.service"
    assert f"SourcePath={config}/web.vm" in files["qemu-run@web.service.d/50-qemu-unit.conf"]


def test_user_as_root_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert os.geteuid() == 0, "the suite runs as root"
    assert commands.main(["--user", "list"]) == 2
    assert "--user: root's VMs are the system's" in capsys.readouterr().err


def test_installed_user_unit_and_generator(tmp_path: Path) -> None:
    lay = install.install(tmp_path, Path("/usr/local"), reload=False)
    assert lay.user_unit == tmp_path / "usr/local/lib/systemd/user/qemu-run@.service"
    text = lay.user_unit.read_text()
    settings_lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert f"ExecStart={install.finalize_command()} --user run %i\n" in text
    for root_only in ("User=", "Group=", "Slice=machine.slice", "register-machine",
                      "StateDirectory=", "PrivateUsers="):
        assert not any(root_only in line for line in settings_lines), root_only
    assert "WantedBy=default.target" in text
    generator_text = lay.user_generator.read_text()
    assert lay.user_generator.name == "qemu-unit-user-generator"
    assert lay.user_generator.stat().st_mode & 0o111 and "main(user=True)" in generator_text
    # systemd reads the unit as a user unit without complaint.
    result = subprocess.run(
        ["systemd-analyze", "verify", "--user", "--man=no",
         str(lay.user_unit.with_name("qemu-run@x.service"))],
        capture_output=True, text=True, check=False,
        env={"SYSTEMD_UNIT_PATH": f"{lay.user_unit.parent}:", "PATH": "/usr/bin:/bin",
             "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)},
    )
    bad = [line for line in result.stderr.splitlines() if "qemu-run@" in line]
    assert bad == [], result.stderr
    install.uninstall(tmp_path, Path("/usr/local"), reload=False)
    assert not lay.user_unit.exists() and not lay.user_generator.exists()
