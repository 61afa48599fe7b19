"""`qemu-unit install`: what a distribution package installs, for a pip installation.

The template unit (ExecStart resolved to this installation), the generator (each
also for users' managers: lib/systemd/user, lib/systemd/user-generators), the
qemu-run user (sysusers.d), tmpfiles.d and man pages, below PREFIX (default
/usr/local, which systemd searches too).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from qemu_unit import paths
from qemu_unit.command import run
from qemu_unit.errors import QemuUnitError
from qemu_unit.log import log
from qemu_unit.paths import CONFIG_DIR, SERVICE_USER

UNIT = paths.TEMPLATE_UNIT
PULL_UNIT = paths.PULL_TEMPLATE_UNIT
CAPS_UNIT = paths.CAPS_UNIT
SNAPSHOT_UNIT = paths.SNAPSHOT_TEMPLATE_UNIT
BACKUP_UNIT = paths.BACKUP_TEMPLATE_UNIT
REGISTER_UNIT = paths.REGISTER_TEMPLATE_UNIT
GENERATOR = "qemu-unit-generator"
USER_GENERATOR = "qemu-unit-user-generator"


@dataclass(frozen=True)
class Layout:
    unit: Path
    pull_unit: Path
    auto_update: Path  # the service; the timer is next to it
    caps_unit: Path
    snapshot_unit: Path
    backup_unit: Path
    register_unit: Path
    generator: Path
    user_unit: Path  # the rootless template, for systemctl --user
    user_generator: Path
    sysusers: Path
    tmpfiles: Path
    mandir: Path


def layout(root: Path, prefix: Path) -> Layout:
    base = root / prefix.relative_to("/")
    return Layout(
        unit=base / "lib/systemd/system" / UNIT,
        pull_unit=base / "lib/systemd/system" / PULL_UNIT,
        auto_update=base / "lib/systemd/system" / paths.AUTO_UPDATE_SERVICE,
        caps_unit=base / "lib/systemd/system" / CAPS_UNIT,
        snapshot_unit=base / "lib/systemd/system" / SNAPSHOT_UNIT,
        backup_unit=base / "lib/systemd/system" / BACKUP_UNIT,
        register_unit=base / "lib/systemd/system" / REGISTER_UNIT,
        generator=base / "lib/systemd/system-generators" / GENERATOR,
        user_unit=base / "lib/systemd/user" / UNIT,
        user_generator=base / "lib/systemd/user-generators" / USER_GENERATOR,
        sysusers=base / "lib/sysusers.d/qemu-unit.conf",
        tmpfiles=base / "lib/tmpfiles.d/qemu-unit.conf",
        mandir=base / "share/man",
    )


def find_units_dir() -> Path:
    """units/ of a source checkout, or the copy a wheel installs under share/."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "units",
        Path(sys.prefix) / "share/qemu-unit/units",
    ):
        if (candidate / UNIT).is_file():
            return candidate
    raise QemuUnitError(f"cannot find {UNIT}: neither a source tree nor {sys.prefix}/share")


def finalize_command() -> str:
    """How systemd should start this installation's qemu-unit."""
    script = Path(sys.executable).parent / "qemu-unit"
    if script.is_file() and os.access(script, os.X_OK):
        return os.fspath(script)
    return f"{sys.executable} -m qemu_unit"


def world_executable(path: Path) -> bool:
    """Whether a non-root service user can reach and run PATH."""
    path = path.resolve()
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH) or path.is_dir()


UNIT_COMMAND = "/usr/bin/qemu-unit"
# The root step (register-machine): the interpreter itself, isolated (-I).
UNIT_PYTHON = "/usr/bin/python3 -I -m qemu_unit"


def render_unit(text: str, command: str, python: str | None = None) -> str:
    """The template with every Exec*= of qemu-unit pointing at COMMAND, and its isolated
    root step at PYTHON (default: this interpreter)."""
    isolated = f"{python or sys.executable} -I -m qemu_unit"
    lines = []
    in_exec = False  # on an Exec*= line or one continuing it
    for line in text.splitlines():
        in_exec = line.startswith("Exec") or in_exec
        if in_exec and UNIT_COMMAND in line:
            line = line.replace(UNIT_COMMAND, command, 1)
        elif in_exec and UNIT_PYTHON in line:
            line = line.replace(UNIT_PYTHON, isolated, 1)
        lines.append(line)
        in_exec = in_exec and line.endswith("\\")
    return "\n".join(lines) + "\n"


def render_generator(text: str) -> str:
    # -I: no user site, no PYTHON* variables (the venv still applies); -B: a generator
    # writes nothing outside its output directories, bytecode included.
    body = text.split("\n", 1)[1]
    return f"#!{sys.executable} -IB\n{body}"


def _write(path: Path, content: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content)
    tmp.chmod(mode)
    tmp.replace(path)
    log.info("installed %s", path)


def systemd_running(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def from_distribution() -> bool:
    """Installed by a .deb/.rpm, whose units systemd already has under /usr/lib."""
    here = Path(__file__).resolve()
    return any(part in ("dist-packages", "site-packages") for part in here.parts) and (
        here.is_relative_to("/usr/lib") or here.is_relative_to("/usr/lib64")
    )


def install(root: Path, prefix: Path, reload: bool = True) -> Layout:
    if from_distribution() and root == Path("/"):
        # A copy under /usr/local would shadow the package's own unit.
        raise QemuUnitError(
            "qemu-unit comes from a distribution package: its unit and generator are "
            "installed already; 'qemu-unit install' is for pip installations"
        )
    units = find_units_dir()
    lay = layout(root, prefix)
    command = finalize_command()
    interpreter = Path(sys.executable)
    if not world_executable(interpreter):
        log.warning(
            "%s cannot be run by the unprivileged user %s: the unit will fail. Install "
            "qemu-unit into a venv made from /usr/bin/python3 (see README).",
            interpreter,
            SERVICE_USER,
        )
    _write(lay.unit, render_unit((units / UNIT).read_text(), command))
    _write(lay.pull_unit, render_unit((units / PULL_UNIT).read_text(), command))
    _write(lay.auto_update, render_unit((units / paths.AUTO_UPDATE_SERVICE).read_text(), command))
    timer = lay.auto_update.with_name(paths.AUTO_UPDATE_TIMER)
    _write(timer, (units / paths.AUTO_UPDATE_TIMER).read_text())
    # Enabled as a vendor preset would: a .wants/ link next to the unit.
    link = timer.parent / "timers.target.wants" / timer.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(f"../{timer.name}")
    _write(lay.caps_unit, render_unit((units / CAPS_UNIT).read_text(), command))
    _write(lay.snapshot_unit, render_unit((units / SNAPSHOT_UNIT).read_text(), command))
    _write(lay.backup_unit, render_unit((units / BACKUP_UNIT).read_text(), command))
    _write(lay.register_unit, render_unit((units / REGISTER_UNIT).read_text(), command))
    _write(lay.generator, render_generator((units / GENERATOR).read_text()), 0o755)
    _write(lay.user_unit, render_unit((units / "user" / UNIT).read_text(), command))
    _write(lay.user_generator, render_generator((units / USER_GENERATOR).read_text()), 0o755)
    _write(lay.sysusers, (units / "qemu-unit.sysusers").read_text())
    _write(lay.tmpfiles, (units / "qemu-unit.tmpfiles").read_text())
    from qemu_unit.cli import manpages

    for page in manpages.write_pages(lay.mandir / "tmp"):
        section = page.name.rsplit(".", 1)[1]
        dest = lay.mandir / f"man{section}" / page.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        page.replace(dest)
    shutil.rmtree(lay.mandir / "tmp", ignore_errors=True)

    rootarg = [] if root == Path("/") else [f"--root={root}"]
    if root == Path("/") or (root / "etc/passwd").exists():
        run(["systemd-sysusers", *rootarg, os.fspath(lay.sysusers)], "creating the user")
    else:
        # An image or an overlay's upper layer: systemd-sysusers creates the user at boot.
        log.info("no %s/etc/passwd: the user %s is left to systemd-sysusers", root, SERVICE_USER)
    if root == Path("/"):
        run(["systemd-tmpfiles", "--create", os.fspath(lay.tmpfiles)], "creating directories")
    else:
        (root / CONFIG_DIR.relative_to("/")).mkdir(parents=True, exist_ok=True)
    if reload and systemd_running(root):
        run(["systemctl", "daemon-reload"], "reloading systemd")
    return lay


def uninstall(root: Path, prefix: Path, reload: bool = True) -> None:
    lay = layout(root, prefix)
    timer = lay.auto_update.with_name(paths.AUTO_UPDATE_TIMER)
    files = [lay.unit, lay.pull_unit, lay.auto_update, timer, lay.caps_unit, lay.snapshot_unit,
             lay.backup_unit, lay.register_unit,
             timer.parent / "timers.target.wants" / timer.name, lay.generator, lay.user_unit,
             lay.user_generator, lay.sysusers, lay.tmpfiles]
    files += [lay.mandir / f"man{p[-1]}" / p for p in _manpage_names()]
    for path in files:
        try:
            path.unlink()
            log.info("removed %s", path)
        except FileNotFoundError:
            pass
    # The user, /etc/qemu-run and VM state stay: they may hold what an administrator made.
    if reload and systemd_running(root):
        run(["systemctl", "daemon-reload"], "reloading systemd")


def _manpage_names() -> tuple[str, ...]:
    from qemu_unit.cli import manpages

    return manpages.PAGES
