"""Saves and snapshots (issue 16) under a real systemd: HostShutdown=save across a reboot
of the container, a plain stop that does not save, `qemu-unit save` by hand, and
`qemu-unit snapshot create|list|revert|delete` with the disk and the TPM state.

The busybox test guest in mode `state` (tests/support/guest.py) draws a token at each
boot, keeps it only in RAM and prints it with a counter every second: a guest that was
restored goes on with the same token and a higher count and never prints `booted`; a
cold boot prints `booted` and a new token. With a disk it first prints the token the boot
before wrote there (`disk: ...`), then writes its own; with a TPM it prints the digest of
the TPM's endorsement key, which changes only with the TPM's state.

The faults: a save into a full state directory (a 1 MiB tmpfs) fails with one line and
the guest runs on; a runner SIGKILLed in the middle of a save (QEMU stopped first, so the
save cannot finish before the kill) leaves no save, and the restart boots cold from the
disks with one line.

One container for the module. `keep` (HostShutdown=save, enabled by [Install]) is shared
by the first two tests in order; `snap` (Image= overlay over a blank base, TPM=yes) is
the snapshot test's. The reboot is a real `systemctl poweroff` inside the container (its
systemd's SystemState is "stopping" as on a host going down) and a new boot on the same
file system (Container.reboot); the journal is persistent, so the first boot's lines are
read after the second.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.vm import (
    assert_graceful_stop,
    console,
    install_qemu_unit,
    invocation,
    prop,
    put_file,
    qemu_pids,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

DATA = Path("/srv/qemu-unit-state")
KEEP = "qemu-run@keep.service"
SNAP = "qemu-run@snap.service"
FULL = "qemu-run@full.service"
KILL = "qemu-run@kill.service"
STATE = Path("/var/lib/qemu-run")
BOOT_TIMEOUT = 120
QU: dict[str, str] = {}
SEEN: dict[str, str] = {}
PREFIX = "qemu-unit-guest: "


def prepare(upper: Path) -> None:
    stage_guest(upper)
    # A persistent journal: the first boot's lines are read after the reboot.
    (upper / "var/log/journal").mkdir(parents=True, exist_ok=True)
    data = upper / DATA.relative_to("/")
    data.mkdir(parents=True)
    data.chmod(0o755)
    blank = data / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "16M"], check=True)
    blank.chmod(0o644)
    write_vm(upper, "keep", vm_text("state", vm="HostShutdown=save",
                                    install="WantedBy=multi-user.target"))
    write_vm(upper, "snap", vm_text("state", vm=f"Image={DATA}/blank.qcow2\nTPM=yes\n"
                                                 "SnapshotSchedule=daily\nSnapshotKeep=2"))
    write_vm(upper, "full", vm_text("state"))
    write_vm(upper, "kill", vm_text("state"))


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    began = time.monotonic()
    with Container("state", prepare, stop_timeout=60) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        QU["bin"] = str(qemu_unit_bin)
        yield ct
        for unit in (KEEP, SNAP, FULL, KILL):
            ct.systemctl("stop", unit, check=False, timeout=120)
    print(f"\nstate module: {time.monotonic() - began:.1f} s in all")


def qu(ct: Container, *args: str) -> subprocess.CompletedProcess[str]:
    return ct.run(QU["bin"], *args, check=False, timeout=120)


def report(ct: Container, vm: str, of: str, after: int = 0) -> dict[str, str]:
    """What the guest of invocation OF printed, once it has ticked past AFTER: 'booted'
    (present only if it booted in this invocation), 'disk', 'ek', 'token', 'tick' (the
    last count) and 'ticked' (its token)."""
    def ticked() -> dict[str, str] | None:
        found: dict[str, str] = {}
        for line in console(ct, vm, of).splitlines():
            if not line.startswith(PREFIX):
                continue
            what = line.removeprefix(PREFIX)
            if what == "booted":
                found["booted"] = "yes"
            elif what == "disk:" or what.startswith("disk: "):
                found["disk"] = what.removeprefix("disk:").strip()
            elif what.startswith("tpm: ek "):
                found["ek"] = what.removeprefix("tpm: ek ")
            elif what.startswith("token "):
                found["token"] = what.removeprefix("token ")
            elif what.startswith("tick "):
                _tick, count, token = what.split()
                found["tick"], found["ticked"] = count, token
        return found if int(found.get("tick", 0)) > after else None

    return wait_for(f"{vm}'s guest to tick (invocation {of})", ticked, timeout=BOOT_TIMEOUT)


def start(ct: Container, unit: str) -> str:
    ct.systemctl("start", unit, timeout=BOOT_TIMEOUT)
    return invocation(ct, unit.removeprefix("qemu-run@").removesuffix(".service"))


def exists(ct: Container, path: Path) -> bool:
    return ct.run("test", "-e", str(path), check=False).returncode == 0


def test_plain_stop_shuts_down_and_save_by_hand_restores(ct: Container) -> None:
    first = start(ct, KEEP)
    cold = report(ct, "keep", first)
    assert cold.get("booted") and cold["ticked"] == cold["token"]
    ct.systemctl("stop", KEEP, timeout=120)
    # A plain stop under HostShutdown=save: the guest is shut down, nothing is saved. The
    # runner (the VM's own user) read the note root's ExecStop= step left: "running".
    assert_graceful_stop(ct, "keep", first)
    assert ("outside a host shutdown (systemd's state: running)"
            in runner_log(ct, "keep", first)), runner_log(ct, "keep", first)
    assert not exists(ct, STATE / "keep/saved")

    second = start(ct, KEEP)
    booted = report(ct, "keep", second)
    assert booted.get("booted"), "the start after a plain stop is a cold boot"
    assert booted["token"] != cold["token"]

    # `qemu-unit save`: the unit stops, status shows the save, the next start restores it.
    saved = qu(ct, "save", "keep")
    assert saved.returncode == 0, saved.stderr
    assert "saved keep: " in saved.stderr
    assert prop(ct, KEEP, "ActiveState") == "inactive"
    assert prop(ct, KEEP, "Result") == "success"
    assert qemu_pids(ct, "keep") == []
    assert exists(ct, STATE / "keep/saved/memory")
    status = qu(ct, "status", "keep").stdout
    assert "Saved state" in status and "the next start restores it" in status, status

    third = start(ct, KEEP)
    restored = report(ct, "keep", third, after=int(booted["tick"]))
    assert "booted" not in restored, console(ct, "keep", third)
    assert restored["ticked"] == booted["token"]
    assert "Restored VM keep from its saved state" in runner_log(ct, "keep", third)
    assert not exists(ct, STATE / "keep/saved")  # spent
    assert "Saved state" not in qu(ct, "status", "keep").stdout
    SEEN["token"], SEEN["invocation"] = booted["token"], third


def test_host_reboot_saves_and_restores(ct: Container) -> None:
    assert "token" in SEEN, "needs the first test"
    before = report(ct, "keep", SEEN["invocation"])
    began = time.monotonic()
    ct.reboot()
    rebooted = ct.boot_seconds
    # Enabled: it comes back by itself, restored (no boot, the same token, counting on).
    wait_for("keep active after the reboot", lambda: prop(ct, KEEP, "ActiveState") == "active",
             timeout=BOOT_TIMEOUT)
    after = invocation(ct, "keep")
    restored = report(ct, "keep", after, after=int(before["tick"]))
    back = time.monotonic() - began
    assert "booted" not in restored, console(ct, "keep", after)
    assert restored["ticked"] == SEEN["token"]
    assert "Restored VM keep from its saved state" in runner_log(ct, "keep", after)
    # The first boot's journal: root's ExecStop= step saw the host stopping, the runner
    # (the VM's own user) read that and saved.
    old = runner_log(ct, "keep", SEEN["invocation"])
    assert "The host is shutting down (HostShutdown=save): saving the VM" in old, old
    assert "Saved VM keep" in old, old
    steps = ct.journal(f"_SYSTEMD_INVOCATION_ID={SEEN['invocation']}", "-o", "cat")
    assert "Stop of keep: systemd's state is 'stopping'" in steps, steps
    assert not exists(ct, STATE / "keep/saved")  # consumed by the restore
    print(f"\nreboot with a saved VM: container up again after {rebooted:.1f} s, "
          f"the guest ticking again after {back:.1f} s")
    ct.systemctl("stop", KEEP, timeout=120)
    assert_graceful_stop(ct, "keep", after)


def test_snapshot_create_list_revert_delete(ct: Container) -> None:
    tpm = STATE / "snap/lib/swtpm"
    first = start(ct, SNAP)
    one = report(ct, "snap", first)
    assert one["disk"] == "" and one.get("ek"), one  # a blank disk, a new TPM

    # Taken while it runs (no guest agent: crash-consistent), with the TPM state.
    made = qu(ct, "snapshot", "create", "snap", "s1")
    assert made.returncode == 0, made.stderr
    assert "snapshot s1 of snap (crash-consistent)" in made.stderr
    listed = qu(ct, "snapshot", "list", "snap").stdout
    assert listed.startswith("s1\t") and "crash-consistent\t1 disk(s)" in listed, listed
    [meta] = json.loads(qu(ct, "snapshot", "list", "snap", "--json").stdout)
    assert meta["name"] == "s1" and meta["tpm"] is True, meta
    [overlay] = meta["disks"]
    refused = qu(ct, "snapshot", "revert", "snap", "s1")
    assert refused.returncode != 0 and "is running: stop it first" in refused.stderr

    # After it: the disk written again, the TPM made anew (its state removed).
    ct.systemctl("stop", SNAP, timeout=120)
    ct.run("rm", "-rf", str(tpm))
    second = start(ct, SNAP)
    two = report(ct, "snap", second)
    assert two["disk"] == one["token"] and two["ek"] != one["ek"], (one, two)
    ct.systemctl("stop", SNAP, timeout=120)
    stopped = qu(ct, "snapshot", "create", "snap", "s2")
    assert "snapshot s2 of snap (stopped)" in stopped.stderr, stopped.stderr

    reverted = qu(ct, "snapshot", "revert", "snap", "s1")
    assert reverted.returncode == 0, reverted.stderr
    third = start(ct, SNAP)
    three = report(ct, "snap", third)
    # The disk as at s1 (the first boot's token, not the second's), the TPM of s1.
    assert three["disk"] == one["token"] != two["token"], (one, two, three)
    assert three["ek"] == one["ek"]
    ct.systemctl("stop", SNAP, timeout=120)

    for name in ("s1", "s2"):
        deleted = qu(ct, "snapshot", "delete", "snap", name)
        assert deleted.returncode == 0, deleted.stderr
    assert qu(ct, "snapshot", "list", "snap").stdout == ""
    info = json.loads(ct.run("qemu-img", "info", "-U", "--output=json", overlay).stdout)
    assert info.get("snapshots", []) == [], info
    assert ct.run("ls", "-A", str(STATE / "snap/snapshots")).stdout == ""


def auto_snapshots(ct: Container) -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(qu(ct, "snapshot", "list", "snap",
                                                   "--json").stdout)
    return [s for s in found if str(s["name"]).startswith("auto-")]


def test_scheduled_snapshots_are_pruned_to_keep(ct: Container) -> None:
    timer = "qemu-run-snapshot@snap.timer"
    job = "qemu-run-snapshot@snap.service"
    assert prop(ct, timer, "ActiveState") == "active"
    assert "OnCalendar=*-*-* 00:00:00 ;" in prop(ct, timer, "TimersCalendar")  # daily
    # What the timer starts, started by hand: three while the VM runs (through its
    # runner), one while it is stopped (root on the files); SnapshotKeep=2 prunes.
    first = start(ct, SNAP)
    before = report(ct, "snap", first)
    for _ in range(3):
        ct.systemctl("start", job, timeout=120)
        assert prop(ct, job, "Result") == "success"
    running = auto_snapshots(ct)
    assert len(running) == 2, running
    assert {s["consistency"] for s in running} == {"crash-consistent"}
    ct.systemctl("stop", SNAP, timeout=120)
    ct.systemctl("start", job, timeout=120)
    assert prop(ct, job, "Result") == "success"
    kept = auto_snapshots(ct)
    assert len(kept) == 2 and kept[0]["name"] == running[1]["name"], (running, kept)
    assert kept[1]["consistency"] == "stopped" and kept[1]["tpm"] is True
    # Root's copies are the VM's: its next start (as its own user) reads them all.
    owner = ct.run("stat", "-L", "-c", "%u", str(STATE / "snap")).stdout
    files = ct.run("find", str(STATE / "snap/snapshots/"), "-printf", "%U %p\n").stdout
    assert {line.split()[0] for line in files.splitlines()} == {owner.strip()}, files
    reverted = qu(ct, "snapshot", "revert", "snap", str(kept[1]["name"]))
    assert reverted.returncode == 0, reverted.stderr
    again = start(ct, SNAP)
    after = report(ct, "snap", again)
    assert after.get("booted") and after["disk"] == before["token"]
    assert after["ek"] == before["ek"]
    ct.systemctl("stop", SNAP, timeout=120)


def test_a_save_that_no_longer_fits_is_refused_until_discarded(ct: Container) -> None:
    first = start(ct, KEEP)
    booted = report(ct, "keep", first)
    assert qu(ct, "save", "keep").returncode == 0
    vm = ct.run("cat", "/etc/qemu-run/keep.vm").stdout
    put_file(ct, "/etc/qemu-run/keep.vm", vm.replace("Memory=256M", "Memory=320M"))
    ct.systemctl("daemon-reload")
    ct.systemctl("start", KEEP, check=False, timeout=BOOT_TIMEOUT)
    wait_for("keep to fail", lambda: prop(ct, KEEP, "ActiveState") == "failed")
    assert prop(ct, KEEP, "ExecMainStatus") == "78"  # no restart loop
    log = ct.journal("-u", KEEP, "-t", "qemu-unit", "-o", "cat")
    assert "the saved state no longer fits VM keep: its domain changed" in log, log
    assert "qemu-unit discard-save keep" in log, log
    assert exists(ct, STATE / "keep/saved/memory")  # never dropped silently
    assert "Saved state" in qu(ct, "status", "keep").stdout
    discarded = qu(ct, "discard-save", "keep")
    assert discarded.returncode == 0 and "removed " in discarded.stderr, discarded.stderr
    ct.systemctl("reset-failed", KEEP)
    again = start(ct, KEEP)
    cold = report(ct, "keep", again)
    assert cold.get("booted") and cold["token"] != booted["token"]

    # A save damaged on disk: its checksum refuses it, it stays until discarded.
    assert qu(ct, "save", "keep").returncode == 0
    memory = STATE / "keep/saved/memory"
    ct.run("sh", "-c", f"printf X | dd of={memory} bs=1 seek=$(( $(stat -c %s {memory}) / 2 ))"
                       " conv=notrunc status=none")
    ct.systemctl("start", KEEP, check=False, timeout=BOOT_TIMEOUT)
    wait_for("keep to fail", lambda: prop(ct, KEEP, "ActiveState") == "failed")
    log = ct.journal("-u", KEEP, "-t", "qemu-unit", "-o", "cat")
    assert "the saved state is corrupt (checksum mismatch)" in log, log
    assert exists(ct, memory)
    assert qu(ct, "discard-save", "keep").returncode == 0
    ct.systemctl("reset-failed", KEEP)


def test_save_with_a_tpm_and_an_overlay_restores(ct: Container) -> None:
    first = start(ct, SNAP)
    booted = report(ct, "snap", first)
    saved = qu(ct, "save", "snap")
    assert saved.returncode == 0, saved.stderr
    assert prop(ct, SNAP, "ActiveState") == "inactive"
    second = start(ct, SNAP)
    restored = report(ct, "snap", second, after=int(booted["tick"]))
    assert "booted" not in restored, console(ct, "snap", second)
    assert restored["ticked"] == booted["token"]
    assert not exists(ct, STATE / "snap/saved")
    # The guest still talks to its TPM, and the TPM is the one it had.
    ct.systemctl("stop", SNAP, timeout=120)
    assert_graceful_stop(ct, "snap", second)
    third = start(ct, SNAP)
    assert report(ct, "snap", third)["ek"] == booted["ek"]
    ct.systemctl("stop", SNAP, timeout=120)


def test_a_full_disk_fails_the_save_and_the_guest_runs_on(ct: Container) -> None:
    # The state directory on a 1 MiB file system: room for the save's metadata, none for
    # the guest's memory. (DynamicUser=: systemd keeps it under private/, a link points there.)
    state = Path("/var/lib/private/qemu-run/full")
    ct.run("mkdir", "-p", str(state))
    ct.run("mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs", str(state))
    try:
        first = start(ct, FULL)
        booted = report(ct, "full", first)
        failed = qu(ct, "save", "full")
        print(f"\nsave into a full state directory: {failed.stderr.strip()}")
        assert failed.returncode != 0
        assert "saving the VM failed" in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        # The guest was resumed: the same boot counts on, nothing half-written is left.
        assert prop(ct, FULL, "ActiveState") == "active"
        later = report(ct, "full", first, after=int(booted["tick"]) + 2)
        assert later["ticked"] == booted["token"]
        left = ct.run("ls", "-A", str(state)).stdout.split()
        assert not {"saved", "saved.new"} & set(left), left
        assert "Saved state" not in qu(ct, "status", "full").stdout
        ct.systemctl("stop", FULL, timeout=120)
        assert_graceful_stop(ct, "full", first)
        # No HostShutdown=save: the unit's root step before SIGTERM did not run at all.
        steps = ct.journal(f"_SYSTEMD_INVOCATION_ID={first}", "-o", "cat")
        assert "systemd's state" not in steps, steps
    finally:
        ct.systemctl("stop", FULL, check=False, timeout=120)
        ct.run("umount", str(state), check=False)


def test_a_runner_killed_while_saving_boots_cold_from_the_disks(ct: Container) -> None:
    first = start(ct, KILL)
    booted = report(ct, "kill", first)
    # QEMU stopped first, so the save cannot finish before the SIGKILL: the kill lands
    # in the middle of it every time, not when the timing happens to allow.
    [qemu] = qemu_pids(ct, "kill")
    ct.run("kill", "-STOP", str(qemu))
    ct.run("systemd-run", "--unit=save-kill", "--collect", "--quiet", QU["bin"], "save", "kill")
    wait_for("the save to begin", lambda: exists(ct, STATE / "kill/saved.new"), timeout=30)
    ct.run("kill", "-KILL", prop(ct, KILL, "MainPID"))
    # Restart=on-failure starts it again: from the disks, with one line about the save.
    wait_for("the restart", lambda: prop(ct, KILL, "ActiveState") == "active"
             and prop(ct, KILL, "InvocationID") not in ("", first), timeout=BOOT_TIMEOUT)
    again = invocation(ct, "kill")
    cold = report(ct, "kill", again)
    assert cold.get("booted") and cold["token"] != booted["token"]
    assert qemu not in qemu_pids(ct, "kill")
    log = runner_log(ct, "kill", again)
    assert "An incomplete saved state was found (the runner was stopped while saving) " \
           "and removed: booting from the disks" in log, log
    assert not exists(ct, STATE / "kill/saved.new") and not exists(ct, STATE / "kill/saved")
    ct.systemctl("stop", KILL, timeout=120)
    assert_graceful_stop(ct, "kill", again)
