"""Each VM its own island (issue 15): a user per VM, and nothing of one VM reachable from
another, tried from VM a's own identity (its QEMU's uid, groups and mount namespace)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_unit.paths import OVERLAY, nvram_file
from tests.support.container import Container
from tests.support.vm import (
    console,
    install_qemu_unit,
    invocation,
    prop,
    qemu_pids,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

OLD_STATE = "/var/lib/qemu-run/old"
BASE = "/srv/old-base.qcow2"
# What today's main (before a user per VM) ran every VM as: the static qemu-run user.
TODAY = "/etc/systemd/system/qemu-run@old.service.d/99-before-upgrade.conf"


def prepare(upper: Path) -> None:
    stage_guest(upper)
    for name in ("a", "b"):
        write_vm(upper, name, vm_text("wait"))
    # A VM with the state that matters: an overlay on a base image and UEFI variables.
    base = upper / BASE.lstrip("/")
    base.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    base.chmod(0o644)
    write_vm(upper, "old", vm_text("efivar", vm=f"Firmware=uefi\nImage={BASE}"))
    today = upper / TODAY.lstrip("/")
    today.parent.mkdir(parents=True)
    today.write_text("[Service]\nDynamicUser=no\nUser=qemu-run\nGroup=qemu-run\n")


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("isolation", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        yield ct


def as_vm(ct: Container, pid: int, script: str) -> tuple[int, str]:
    """Run SCRIPT with QEMU PID's uid, gid and groups, in its mount namespace."""
    status = dict(line.split(":\t", 1) for line in
                  ct.run("cat", f"/proc/{pid}/status").stdout.splitlines() if ":\t" in line)
    uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
    groups = ",".join(status["Groups"].split()) or gid
    result = ct.run("nsenter", "-t", str(pid), "-m", "--", "setpriv", f"--reuid={uid}",
                    f"--regid={gid}", f"--groups={groups}", "--inh-caps=-all",
                    "sh", "-c", script, check=False)
    return result.returncode, result.stdout + result.stderr


ATTEMPTS = {
    "list b's runtime directory": "ls /run/qemu-run/b",
    "read b's status file": "cat /run/qemu-run/b/status.json",
    "read b's QEMU log": "cat /run/qemu-run/b/log/qemu/b.log",
    "read b's domain XML": "cat /run/qemu-run/b/run/qemu/b.xml",
    "read b's console.log": "cat /var/log/qemu-run/b/console.log",
    "read b's console.log (private)": "cat /var/log/private/qemu-run/b/console.log",
    "list b's state": "ls /var/lib/qemu-run/b/ /var/lib/private/qemu-run/b/",
    "write b's runtime directory": "touch /run/qemu-run/b/planted",
    "write the shared capability cache": "touch /var/cache/qemu-run/qemu/capabilities/x.xml",
    "replace a shared capability file": "for f in /var/cache/qemu-run/qemu/capabilities/*.xml;"
                                        " do echo > $f || exit 1; done",
    "write /run": "touch /run/planted",
    "connect to b's console attach socket":
        "/usr/bin/python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); "
        "s.connect(\"/run/qemu-run/b/console-attach.sock\")'",
    "connect to b's control socket":
        "/usr/bin/python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); "
        "s.connect(\"/run/qemu-run/b/control.sock\")'",
}


def test_two_vms_two_users_nothing_of_b_reachable_from_a(ct: Container) -> None:
    ct.systemctl("start", "qemu-run@a", "qemu-run@b")
    try:
        [a], [b] = qemu_pids(ct, "a"), qemu_pids(ct, "b")
        owners = {vm: ct.run("stat", "-c", "%u %U", f"/proc/{pid}").stdout.split()
                  for vm, pid in (("a", a), ("b", b))}
        assert owners["a"][0] != owners["b"][0], owners
        assert owners["a"][1] == "qemu-vm-a" and owners["b"][1] == "qemu-vm-b", owners
        assert owners["a"][0] != ct.run("id", "-u", "qemu-run").stdout.strip()
        # The method works: a reaches its own files this way.
        code, out = as_vm(ct, a, "cat /run/qemu-run/a/status.json && ls /var/lib/qemu-run/a/")
        assert code == 0, out
        refused = {}
        for what, script in ATTEMPTS.items():
            code, out = as_vm(ct, a, script)
            refused[what] = code != 0
            assert code != 0, f"{what}: {out}"
        # b's runner saw no client (the review's attempt was logged there).
        journal = ct.journal("-u", "qemu-run@b.service", "-o", "cat")
        assert "Console client attached" not in journal and "refused" not in journal
        assert all(refused.values())
        # The capability cache the VMs share is intact and readable by both.
        assert ct.run("sh", "-c", "ls /var/cache/qemu-run/qemu/capabilities/*.xml").stdout
    finally:
        ct.systemctl("stop", "qemu-run@a", "qemu-run@b")


def test_an_installed_vm_keeps_its_state_across_the_upgrade(ct: Container) -> None:
    """A VM run as before (static qemu-run, /var/lib/qemu-run/old a plain directory): its
    guest writes a UEFI variable, the runner makes its overlay. After the upgrade (the
    drop-in gone: DynamicUser=, qemu-vm-old) the same files boot, the variable is read back."""
    unit = "qemu-run@old.service"
    ct.systemctl("start", unit)
    try:
        wait_for("variable created", lambda: "efivar created" in console(ct, "old"), timeout=120)
    finally:
        ct.systemctl("stop", unit)
    files = f"{OLD_STATE}/{OVERLAY} {OLD_STATE}/{nvram_file('old')}"
    before = ct.run("sh", "-c", f"stat -c '%i %U %s' {OLD_STATE} {files}").stdout.split("\n")
    assert all(line.split()[1] == "qemu-run" for line in before if line), before
    assert ct.run("test", "-L", OLD_STATE, check=False).returncode != 0  # a plain directory
    ct.run("rm", TODAY)
    ct.systemctl("daemon-reload")
    assert prop(ct, unit, "DynamicUser") == "yes"
    ct.systemctl("start", unit)
    try:
        of = invocation(ct, "old")
        wait_for("variable read back", lambda: "efivar=hello" in console(ct, "old", of),
                 timeout=120)
        # systemd moved it to /var/lib/private (DynamicUser=) and handed it to old's user;
        # the runner kept the overlay it found.
        assert ct.run("readlink", OLD_STATE).stdout.strip() == "../private/qemu-run/old"
        after = ct.run("sh", "-c", f"stat -L -c '%i %U' {files}").stdout.split("\n")
        assert [line.split()[0] for line in after if line] == \
            [line.split()[0] for line in before[1:] if line]
        assert all(line.split()[1] == "qemu-vm-old" for line in after if line), after
        assert "Created the overlay" not in runner_log(ct, "old", of)
    finally:
        ct.systemctl("stop", unit)


def test_first_start_cost_with_the_shared_cache(ct: Container) -> None:
    """The figures in README: the host's one probe (qemu-unit-caps.service on a cold cache),
    then a VM's start, which copies the shared capability cache into its runtime directory
    (afresh at every start) and probes nothing itself."""
    ct.run("rm", "-rf", "/var/cache/qemu-run/qemu")
    started = time.monotonic()
    ct.systemctl("restart", "qemu-unit-caps.service")
    probe = time.monotonic() - started
    this = prop(ct, "qemu-unit-caps.service", "InvocationID")
    log = ct.wait_journal("Probed QEMU's capabilities in", f"_SYSTEMD_INVOCATION_ID={this}",
                          "-o", "cat")
    probes = [line for line in log.splitlines() if line.startswith("Probed QEMU's")]
    assert len(probes) == 1, probes
    started = time.monotonic()
    ct.systemctl("start", "qemu-run@b")
    first = time.monotonic() - started
    ct.systemctl("stop", "qemu-run@b")
    started = time.monotonic()
    ct.systemctl("start", "qemu-run@b")
    again = time.monotonic() - started
    ct.systemctl("stop", "qemu-run@b")
    print(f"qemu-unit-caps.service on a cold cache: {probe:.2f}s ({probes[0]}); systemctl "
          f"start of a VM, first: {first:.2f}s; again: {again:.2f}s")
    log = ct.journal("-u", "qemu-run@b.service", "-o", "cat")
    assert "cache is cold" not in log
    wait_for("no QEMU", lambda: qemu_pids(ct, "b") == [] or None)
