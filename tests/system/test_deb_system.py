"""The .deb under a real systemd: install, generator, a VM at boot, stop, purge.

Everything runs against the installed package (/usr/bin/qemu-unit, the generator in
/usr/lib/systemd/system-generators, the module in /usr/lib/python3/dist-packages),
never against the source tree. The package's dependencies come from the host image.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_unit.cli import install
from tests.support.container import Container
from tests.support.vm import (
    assert_graceful_stop,
    console,
    invocation,
    prop,
    qemu_pids,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = Path("/srv/qemu-unit-deb")  # inside the container; not /tmp (a fresh tmpfs there)
UNIT = "/usr/lib/systemd/system/qemu-run@.service"
GENERATOR = "/usr/lib/systemd/system-generators/qemu-unit-generator"
WANTS = "/run/systemd/generator/multi-user.target.wants/qemu-run@web.service"


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("dpkg-buildpackage", "lintian", "git"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the .deb cannot be built")
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run([str(REPO / "packaging/build-deb"), str(out)],
                          capture_output=True, text=True, timeout=300)
    # lintian's verdict is test_packaging's business; here only the .deb matters.
    debs = list(out.glob("qemu-unit_*_all.deb"))
    assert len(debs) == 1, done.stdout + done.stderr
    return debs[0]


def _hide(upper: Path, path: Path) -> None:
    """Make PATH of the host root vanish inside the container (an overlayfs whiteout)."""
    if not os.path.lexists(path):
        return
    whiteout = upper / path.relative_to("/")
    whiteout.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(whiteout, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def _as_fresh_machine(upper: Path) -> None:
    """Undo what setup.sh did to the host: no /usr/local qemu-unit, no qemu-run user,
    no kvm group. The package alone must bring them. Without the image's
    policy-rc.d (exit 101: "no service actions"), maintainer scripts act as on a
    real machine."""
    lay = install.layout(Path("/"), Path("/usr/local"))
    for path in (lay.unit, lay.generator, lay.sysusers, lay.tmpfiles,
                 Path("/usr/local/bin/qemu-unit"), Path("/usr/sbin/policy-rc.d")):
        _hide(upper, path)
    for name in ("passwd", "group", "shadow", "gshadow"):
        host = Path("/etc", name)
        if not host.exists():
            continue
        lines = [line for line in host.read_text().splitlines(keepends=True)
                 if line.split(":", 1)[0] not in ("qemu-run", "kvm")]
        copy = upper / "etc" / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text("".join(lines))
        shutil.copymode(host, copy)


@pytest.fixture(scope="module")
def ct(deb: Path) -> Iterator[Container]:
    def prepare(upper: Path) -> None:
        _as_fresh_machine(upper)
        stage_guest(upper)
        # Present before the package: its postinst's daemon-reload must pick it up.
        write_vm(upper, "web", vm_text("wait", install="WantedBy=multi-user.target"))
        target = upper / DEB_DIR.relative_to("/")
        target.mkdir(parents=True)
        shutil.copy(deb, target / deb.name)

    with Container("deb", prepare) as ct:
        assert ct.run("getent", "passwd", "qemu-run", check=False).returncode == 2
        assert ct.run("getent", "group", "kvm", check=False).returncode == 2
        ct.run("dpkg", "-i", str(DEB_DIR / deb.name), timeout=120)
        yield ct


def test_install_creates_user_and_links_but_starts_no_vm(ct: Container) -> None:
    assert ct.run("dpkg-query", "-W", "-f", "${Status}", "qemu-unit").stdout == (
        "install ok installed")
    user = ct.run("id", "qemu-run").stdout
    assert "(kvm)" in user, user
    assert ct.run("test", "-d", "/etc/qemu-run", check=False).returncode == 0
    # The generator ran on the postinst's daemon-reload, from the installed files.
    link = ct.run("readlink", WANTS, check=False)
    assert link.returncode == 0, "no multi-user.target.wants link after dpkg -i"
    assert link.stdout.strip() == UNIT
    assert "multi-user.target" in prop(ct, "qemu-run@web.service", "WantedBy")
    assert prop(ct, "qemu-run@web.service", "ActiveState") == "inactive"
    assert prop(ct, "qemu-run@web.service", "SourcePath") == "/etc/qemu-run/web.vm"
    assert qemu_pids(ct) == []
    # The installed module, not a copy elsewhere on sys.path.
    where = ct.run("/usr/bin/python3", "-c", "import qemu_unit; print(qemu_unit.__file__)")
    assert where.stdout.strip() == "/usr/lib/python3/dist-packages/qemu_unit/__init__.py"


def test_daemon_reload_picks_up_a_new_vm(ct: Container) -> None:
    ct.run("sh", "-c", "cat > /etc/qemu-run/late.vm",
           input=vm_text("wait", install="WantedBy=multi-user.target"))
    late = "/run/systemd/generator/multi-user.target.wants/qemu-run@late.service"
    assert ct.run("test", "-L", late, check=False).returncode != 0
    ct.systemctl("daemon-reload")
    assert ct.run("readlink", late).stdout.strip() == UNIT
    ct.run("rm", "/etc/qemu-run/late.vm")
    ct.systemctl("daemon-reload")
    assert ct.run("test", "-L", late, check=False).returncode != 0


def test_vm_starts_logs_console_and_stops_cleanly(ct: Container) -> None:
    unit = "qemu-run@web.service"
    ct.systemctl("start", unit)
    this = invocation(ct, "web")
    try:
        assert prop(ct, unit, "ActiveState") == "active"
        assert "path=/usr/bin/qemu-unit" in prop(ct, unit, "ExecStart")
        [pid] = qemu_pids(ct, "web")
        assert ct.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip() == "qemu-vm-web"
        wait_for("guest console in the journal",
                 lambda: "qemu-unit-guest: booted" in console(ct, "web"), timeout=60)
    finally:
        ct.systemctl("stop", unit)
    assert_graceful_stop(ct, "web", this)
    assert ct.run("test", "-d", "/var/lib/qemu-run/web", check=False).returncode == 0


def test_purge_stops_vms_removes_the_package_but_keeps_vm_state(ct: Container) -> None:
    unit = "qemu-run@web.service"
    ct.systemctl("start", unit)
    wait_for("second boot", lambda: console(ct, "web").count("qemu-unit-guest: mode=wait") >= 2,
             timeout=60)
    time.sleep(0.5)  # the guest listens for the power button right after that line
    ct.run("touch", "/var/lib/qemu-run/web/keep-me")
    ct.run("dpkg", "--purge", "qemu-unit", timeout=180)
    # prerm shut the VM down gracefully before its runner went away.
    assert console(ct, "web").count("qemu-unit-guest: power button pressed") >= 2
    assert qemu_pids(ct) == []
    for path in (UNIT, GENERATOR, "/usr/bin/qemu-unit", "/usr/lib/sysusers.d/qemu-unit.conf",
                 "/var/cache/qemu-run", WANTS):
        assert ct.run("test", "-e", path, check=False).returncode != 0, path
    assert ct.run("test", "-L", WANTS, check=False).returncode != 0
    # VM state and the administrator's configuration stay.
    assert ct.run("test", "-f", "/var/lib/qemu-run/web/keep-me", check=False).returncode == 0
    assert ct.run("test", "-f", "/etc/qemu-run/web.vm", check=False).returncode == 0
    assert ct.run("dpkg-query", "-W", "qemu-unit", check=False).returncode != 0
    assert prop(ct, unit, "LoadState") == "not-found"
