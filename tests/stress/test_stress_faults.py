"""Faults under a real systemd: restart storms, a stalled runner, a hung QEMU, journald
restarts, full disks (issue 10). Counts are tuned to CI's time budget, not the assertions;
each test prints what it did and how long recovery took (`pytest -s` shows it)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_unit.vm.runner import MonitorProbe
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

STORM = ("sa", "sb", "sc")
STORM_ROUNDS = 5  # x 3 VMs = 15 start/stop cycles
KILLS = 10
# Storms test cleanup, not the crash-loop policy: no start limit, quick restarts.
STORM_UNIT = "StartLimitIntervalSec=0"
STORM_SERVICE = "RestartSec=200ms"
STATE = "/var/lib/qemu-run"
# Where systemd keeps each VM's state (DynamicUser=): /var/lib/qemu-run/NAME links there.
PRIVATE = "/var/lib/private/qemu-run"
FULL_MB = 24


def prepare(upper: Path) -> None:
    stage_guest(upper)
    for name in STORM:
        write_vm(upper, name, vm_text("wait", unit=STORM_UNIT, service=STORM_SERVICE))
    write_vm(upper, "stall", vm_text("wait", service="WatchdogSec=4s"))
    write_vm(upper, "hang", vm_text("wait", service="WatchdogSec=6s"))
    # Reboots every ~5 s and answers a monitor probe every 3 s: many events. (A shorter
    # period would call a monitor that a busy 2-core host keeps waiting ~1 s hung.)
    write_vm(upper, "long", vm_text("reboot", service="WatchdogSec=6s"))
    write_vm(upper, "efi", vm_text("efivar", vm="Firmware=uefi"))
    write_vm(upper, "fill", vm_text("fill", vm=f"Disk={STATE}/fill/disk.qcow2,format=qcow2"))


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("stress", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        yield ct


def unit(vm: str) -> str:
    return f"qemu-run@{vm}.service"


def active(ct: Container, vm: str) -> bool:
    return prop(ct, unit(vm), "ActiveState") == "active"


def main_pid(ct: Container, vm: str) -> int:
    return int(prop(ct, unit(vm), "MainPID"))


def restarted(ct: Container, vm: str, old_pid: int, restarts: int) -> bool:
    """systemd restarted VM on its own: a new runner is up (MainPID is 0 in between)."""
    return (int(prop(ct, unit(vm), "NRestarts")) > restarts and active(ct, vm)
            and main_pid(ct, vm) not in (0, old_pid))


def booted(ct: Container, vm: str) -> int:
    return console(ct, vm).count("qemu-unit-guest: booted")


def fds_and_threads(ct: Container, pid: int) -> tuple[int, list[str]]:
    fds = len(ct.run("ls", f"/proc/{pid}/fd").stdout.split())
    threads = ct.run("sh", "-c", f"cat /proc/{pid}/task/*/comm").stdout.split("\n")
    return fds, sorted(t for t in threads if t)


def listing(ct: Container, path: str) -> list[str]:
    out = ct.run("sh", "-c", f"cd {path} 2>/dev/null && find . | sort", check=False).stdout
    return out.split()


def assert_clean(ct: Container, *vms: str) -> None:
    """No QEMU, nothing left in /run/qemu-run, the units inactive."""
    assert ct.run("pgrep", "-a", "qemu-system", check=False).stdout == ""
    assert ct.run("ls", "-A", "/run/qemu-run").stdout.split() == []
    for vm in vms:
        assert prop(ct, unit(vm), "ActiveState") == "inactive", vm


def test_start_stop_storm_leaves_nothing_behind(ct: Container) -> None:
    units = [unit(n) for n in STORM]
    sizes: list[str] = []
    start = time.monotonic()
    for round_ in range(STORM_ROUNDS):
        before = {n: booted(ct, n) for n in STORM}
        ct.systemctl("start", *units, timeout=120)
        for n in STORM:
            wait_for(f"{n} boot {round_}", lambda n=n, b=before: booted(ct, n) > b[n], timeout=90)
        ct.systemctl("stop", *units, timeout=120)
        assert_clean(ct, *STORM)
        # The persistent state must not grow with every start.
        sizes.append(ct.run("du", "-sb", "--apparent-size", *(f"{PRIVATE}/{n}" for n in STORM))
                     .stdout)
    elapsed = time.monotonic() - start
    print(f"STRESS start/stop: {STORM_ROUNDS * len(STORM)} cycles in {elapsed:.1f} s")
    assert sizes[1:] == sizes[1:2] * (len(sizes) - 1), sizes
    for n in STORM:
        log = runner_log(ct, n)
        assert log.count("the guest powered off") == STORM_ROUNDS, log[-2000:]
        assert "destroy" not in log.lower()
        assert prop(ct, unit(n), "Result") == "success"


def test_sigkill_storm_restarts_every_time(ct: Container) -> None:
    vm = "sa"
    ct.systemctl("start", unit(vm))
    clean = listing(ct, f"/run/qemu-run/{vm}")
    restarts = []
    try:
        for i in range(KILLS):
            old, [old_qemu] = main_pid(ct, vm), qemu_pids(ct, vm)
            ct.run("kill", "-9", str(old))
            t = time.monotonic()
            wait_for(f"restart {i}", lambda old=old, i=i: restarted(ct, vm, old, i), timeout=60)
            restarts.append(time.monotonic() - t)
            # Exactly one QEMU, and not the old one: none left behind.
            assert qemu_pids(ct, vm) not in ([], [old_qemu])
            assert len(qemu_pids(ct, vm)) == 1
        assert int(prop(ct, unit(vm), "NRestarts")) == KILLS
        # Each restart is registered with machined again: the register unit has no start
        # limit of its own to hit (its default one gave up after five restarts in 10 s).
        wait_for("registered", lambda: ct.run(
            "machinectl", "show", "--property=Leader", "--value", vm, check=False).stdout.strip()
            == str(main_pid(ct, vm)), timeout=30)
        register = ct.journal("-u", f"qemu-run-register@{vm}.service", "-o", "cat")
        assert "start-limit-hit" not in register, register[-2000:]
        # The embed root a restart sees is as clean as after a first start.
        assert listing(ct, f"/run/qemu-run/{vm}") == clean
    finally:
        ct.systemctl("stop", unit(vm))
    print(f"STRESS SIGKILL storm: {KILLS} kills, restart median "
          f"{sorted(restarts)[len(restarts) // 2]:.2f} s, max {max(restarts):.2f} s")
    assert_clean(ct, vm)


def test_stalled_runner_is_killed_by_the_watchdog_with_its_qemu(ct: Container) -> None:
    vm = "stall"
    ct.systemctl("start", unit(vm))
    try:
        runner, [qemu] = main_pid(ct, vm), qemu_pids(ct, vm)
        ct.run("kill", "-STOP", str(runner))
        t = time.monotonic()
        wait_for("restart", lambda: restarted(ct, vm, runner, 0), timeout=90)
        recovered = time.monotonic() - t
        assert qemu not in qemu_pids(ct, vm) and len(qemu_pids(ct, vm)) == 1
        journal = ct.journal("-u", unit(vm), "-o", "cat")
        assert "Watchdog timeout" in journal, journal[-2000:]
    finally:
        ct.systemctl("stop", unit(vm))
    print(f"STRESS stalled runner (WatchdogSec=4s): restarted after {recovered:.1f} s")
    assert_clean(ct, vm)


def test_hung_qemu_is_noticed_and_the_unit_recovers(ct: Container) -> None:
    vm = "hang"
    ct.systemctl("start", unit(vm))
    try:
        runner, [qemu] = main_pid(ct, vm), qemu_pids(ct, vm)
        this = invocation(ct, vm)
        time.sleep(4)  # a few answered probes first
        # Taken before the kill: QEMU stops after this moment, never before it.
        stopped = time.time()
        t = time.monotonic()
        ct.run("kill", "-STOP", str(qemu))
        wait_for("hang noticed", lambda: "it is hung" in runner_log(ct, vm, this), timeout=30)
        # When the runner said so, by the journal's clock (the container shares the host's).
        said = next(json.loads(line) for line in ct.journal(
            f"_SYSTEMD_INVOCATION_ID={this}", "-t", "qemu-unit", "-o", "json").splitlines()
            if "it is hung" in str(json.loads(line).get("MESSAGE")))
        noticed = int(said["__REALTIME_TIMESTAMP"]) / 1e6 - stopped
        wait_for("restart", lambda: restarted(ct, vm, runner, 0), timeout=60)
        recovered = time.monotonic() - t
        # The runner noticed, not systemd's watchdog.
        assert "Watchdog timeout" not in ct.journal("-u", unit(vm), "-o", "cat")
        # The design (runner.loop): a probe every half WatchdogSec= (3 s); a question
        # unanswered for hang_threshold (5 s) is a hang, seen at the tick after that. QEMU
        # stopped just after a tick waits up to one interval for its question: at most
        # 3 + 2 * 3 = 9 s, never less than the threshold.
        interval = 6 / 2
        threshold = MonitorProbe.hang_threshold(interval)
        bound = interval + math.ceil(threshold / interval) * interval
        assert threshold <= noticed <= bound + 1.0, (noticed, bound)  # 1 s: a late wake-up
        assert qemu not in qemu_pids(ct, vm) and len(qemu_pids(ct, vm)) == 1
    finally:
        ct.systemctl("stop", unit(vm))
    print(f"STRESS hung QEMU (WatchdogSec=6s): noticed after {noticed:.1f} s, "
          f"restarted after {recovered:.1f} s")
    assert_clean(ct, vm)


def test_long_running_runner_leaks_nothing_across_events_and_journald_restarts(
    ct: Container,
) -> None:
    vm = "long"
    ct.systemctl("start", unit(vm))
    try:
        # Warm-up: libvirt starts a worker thread for the first reboot it handles.
        wait_for("first reboot", lambda: "Guest rebooted" in runner_log(ct, vm), timeout=60)
        pid = main_pid(ct, vm)
        before = fds_and_threads(ct, pid)
        boots0 = booted(ct, vm)
        for i in range(2):
            ct.systemctl("restart", "systemd-journald.service")
            n = booted(ct, vm)
            # Console lines and runner lines both reach the new journald.
            wait_for(f"console after journald restart {i}", lambda n=n: booted(ct, vm) > n,
                     timeout=150)
        wait_for("many reboots", lambda: booted(ct, vm) >= boots0 + 6, timeout=300)
        assert main_pid(ct, vm) == pid, "the runner died"
        after = fds_and_threads(ct, pid)
        reboots = booted(ct, vm) - boots0
    finally:
        ct.systemctl("stop", unit(vm))
    print(f"STRESS long-running runner: {reboots} reboots, 2 journald restarts, "
          f"fds/threads {before} -> {after}")
    assert after == before
    assert prop(ct, unit(vm), "NRestarts") == "0"


def _fill_state_fs(ct: Container, leave_kb: int) -> None:
    ct.run("sh", "-c", f"rm -f {PRIVATE}/filler; "
           f"avail=$(df -k --output=avail {PRIVATE} | tail -1); "
           f"dd if=/dev/zero of={PRIVATE}/filler bs=1k count=$((avail - {leave_kb})) "
           "2>/dev/null; true")


def test_full_state_disk_at_start_and_while_running(ct: Container) -> None:
    # A small tmpfs where the VMs' state directories are; the units start after the mount.
    ct.run("mkdir", "-p", PRIVATE)
    ct.run("chmod", "0700", str(Path(PRIVATE).parent))
    ct.run("mount", "-t", "tmpfs", "-o", f"size={FULL_MB}m,mode=0755", "tmpfs", PRIVATE)
    try:
        _full_at_start(ct)
        _full_while_running(ct)
    finally:
        ct.systemctl("stop", unit("efi"), unit("fill"), check=False)
        ct.run("umount", PRIVATE, check=False)


def _full_at_start(ct: Container) -> None:
    vm = "efi"
    _fill_state_fs(ct, 0)
    t = time.monotonic()
    ct.systemctl("start", unit(vm), check=False, timeout=120)
    # Every attempt fails: systemd restarts it until StartLimitBurst=, then gives up.
    wait_for("start limit", lambda: "Start request repeated too quickly"
             in ct.journal("-u", unit(vm), "-o", "cat"), timeout=240)
    gave_up = time.monotonic() - t
    assert prop(ct, unit(vm), "ActiveState") == "failed"
    burst = int(prop(ct, unit(vm), "StartLimitBurst"))
    assert int(prop(ct, unit(vm), "NRestarts")) == burst
    time.sleep(5)  # longer than RestartSec=: no further attempt
    attempts = runner_log(ct, vm).count("No space left on device")
    assert attempts == burst, attempts
    errors = ct.journal("-u", unit(vm), "-t", "qemu-unit", "-p", "err", "-o", "cat")
    assert "No space left on device" in errors, errors[-2000:]
    # libvirt writes the NVRAM as .new and renames it: no half-written variable store.
    assert "efi_VARS.fd" not in ct.run("ls", f"{PRIVATE}/{vm}").stdout.split()
    print(f"STRESS full disk at start: {attempts} failed attempts, gave up after "
          f"{gave_up:.1f} s ({prop(ct, unit(vm), 'NRestarts')} restarts)")
    # Room again: reset-failed, and the firmware boots with a sound NVRAM.
    ct.run("rm", f"{PRIVATE}/filler")
    ct.systemctl("reset-failed", unit(vm))
    ct.systemctl("start", unit(vm))
    wait_for("UEFI variable written", lambda: "efivar created" in console(ct, vm), timeout=120)
    ct.systemctl("stop", unit(vm), timeout=120)
    assert prop(ct, unit(vm), "Result") == "success"


def _full_while_running(ct: Container) -> None:
    vm = "fill"
    # Made where systemd keeps it (a move from /var/lib/qemu-run would cross file systems);
    # systemd hands it to the VM's user at the start.
    ct.run("mkdir", "-p", f"{PRIVATE}/{vm}")
    ct.run("qemu-img", "create", "-q", "-f", "qcow2", f"{PRIVATE}/{vm}/disk.qcow2", "8M")
    _fill_state_fs(ct, 2048)  # the 8 MB disk can grow by 2 MB only
    ct.systemctl("start", unit(vm))
    wait_for("disk full", lambda: "no space left on device" in runner_log(ct, vm), timeout=90)
    status = prop(ct, unit(vm), "StatusText")
    assert status.startswith("Paused: disk ") and "no space left" in status, status
    assert active(ct, vm) and len(qemu_pids(ct, vm)) == 1
    time.sleep(12)  # two resume attempts that fail again must not log again
    assert runner_log(ct, vm).count("no space left on device") == 1
    assert "fill ended" not in console(ct, vm)
    t = time.monotonic()
    ct.run("rm", f"{PRIVATE}/filler")
    wait_for("guest resumed", lambda: "runs again after the disk error" in runner_log(ct, vm),
             timeout=30)
    resumed = time.monotonic() - t
    wait_for("fill ended", lambda: "fill ended" in console(ct, vm), timeout=60)
    assert prop(ct, unit(vm), "StatusText").startswith("Running")
    ct.systemctl("stop", unit(vm), timeout=120)
    assert "power button pressed" in console(ct, vm)
    assert prop(ct, unit(vm), "Result") == "success"
    assert prop(ct, unit(vm), "NRestarts") == "0"
    print(f"STRESS full disk while running: paused, resumed {resumed:.1f} s after room "
          "was made, nothing lost")
