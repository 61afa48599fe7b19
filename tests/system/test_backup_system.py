"""Live backups of a real Debian 12 guest under qemu-run@NAME.service (issue 16): a full
point taken while the guest writes restores to a file system that passes fsck and holds
the data of the moment of the backup; an incremental point after 10 MB written is about
10 MB; its checkpoint survives a restart of the VM; a corrupted backup is refused; a full
target disk leaves the VM running and nothing under a final name; the BackupSchedule= timer's
unit, run as systemd runs it (root, its sandbox), adds a point to BackupTo=. Last,
HostShutdown=save across a reboot of the container: a process started in the guest runs
on, the uptime goes on from the save, the guest agent sets the clock.

One Debian VM (`src`, Image= overlay, direct kernel boot, guest agent) is booted once for
the module and shared by the tests in order. The restored copies are checked from the host
(qemu-img reads the restored disk, e2fsck and debugfs read its root file system); one
is restored and booted in a second container, another host that has the backup directory
and the kernel files but nothing else of src.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.debian import CMDLINE, ESP_KIB, ROOT_MIB, build_debian_image
from tests.support.vm import install_qemu_unit, prop, runner_log, wait_for, write_vm

pytestmark = pytest.mark.system

DATA = Path("/srv/qemu-unit-backup")
BACKUPS = Path("/srv/backups")
SMALL = Path("/srv/small")
BOOT_TIMEOUT = 600
QU: dict[str, str] = {}
SEEN: dict[str, str] = {}
ROOT_OFFSET = (1 + ESP_KIB // 1024) * 2**20  # the root partition (debian.py's layout)


def src_vm() -> str:
    return f"""\
[VM]
Image={DATA}/base.qcow2
Kernel={DATA}/vmlinuz
Initrd={DATA}/initrd.img
KernelCmdline={CMDLINE}
Accel=tcg
Memory=1G
CPUs=2
Network=none
Ready=agent
ShutdownMode=agent acpi
ShutdownTimeout=120s
HostShutdown=save
# Never due during the test: the test starts the timer's unit itself.
BackupSchedule=Sun *-12-24 04:00
BackupTo={BACKUPS}

[Service]
TimeoutStartSec={BOOT_TIMEOUT}
"""


def prepare(upper: Path) -> None:
    import shutil

    image = build_debian_image()
    data = upper / DATA.relative_to("/")
    data.mkdir(parents=True)
    data.chmod(0o755)
    for src, name in ((image.disk, "base.qcow2"), (image.kernel, "vmlinuz"),
                      (image.initrd, "initrd.img")):
        shutil.copyfile(src, data / name)
        (data / name).chmod(0o644)
    write_vm(upper, "src", src_vm())
    # A persistent journal: the save's lines are read after the container's reboot.
    (upper / "var/log/journal").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("backup", prepare, stop_timeout=60) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        QU["bin"] = str(qemu_unit_bin)
        yield ct
        ct.run("umount", str(SMALL), check=False)


def start(ct: Container, vm: str = "src") -> None:
    unit = f"qemu-run@{vm}.service"
    began = time.monotonic()
    ct.systemctl("start", "--no-block", unit)
    # The start job waits, the unit "inactive", while qemu-unit-caps.service probes QEMU
    # (a new container's cache is cold): first the job's start, then its end.
    wait_for("the start", lambda: prop(ct, unit, "ActiveState") != "inactive",
             timeout=BOOT_TIMEOUT)
    wait_for("ready", lambda: prop(ct, unit, "ActiveState") != "activating",
             timeout=BOOT_TIMEOUT)
    why = ct.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, "-u",
                 "qemu-unit-caps.service", check=False).stdout
    assert prop(ct, unit, "ActiveState") == "active", runner_log(ct, vm) + why
    print(f"{vm} ready after {time.monotonic() - began:.0f} s")


@pytest.fixture(scope="module")
def src(ct: Container) -> Iterator[str]:
    start(ct)
    yield "src"
    ct.systemctl("stop", "qemu-run@src.service", timeout=180)


def qu(ct: Container, *args: str, check: bool = True, timeout: float = 600
       ) -> tuple[int, str]:
    proc = ct.run(QU["bin"], *args, check=False, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc.returncode, proc.stderr


def guest(ct: Container, command: str, vm: str = "src") -> str:
    proc = ct.run(QU["bin"], "exec", vm, "--", "sh", "-c", command, check=False,
                  timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout)


def last_number(ct: Container) -> int:
    return int(guest(ct, "tail -n 1 /var/tmp/log").strip() or 0)


def manifest(ct: Container, directory: Path = BACKUPS) -> dict[str, object]:
    value: dict[str, object] = json.loads(ct.run("cat", f"{directory}/manifest.json").stdout)
    return value


def root_fs(ct: Container, overlay: str, out: str) -> None:
    """The root partition of the restored disk as a raw file."""
    spec = {"driver": "raw", "offset": ROOT_OFFSET, "size": ROOT_MIB * 2**20,
            "file": {"driver": "qcow2", "file": {"driver": "file", "filename": overlay}}}
    ct.run("qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), out, timeout=300)


def test_full_backup_while_writing_restores_consistent(ct: Container, src: str) -> None:
    # A writer in the guest: numbers 1, 2, 3... appended, each one synced.
    guest(ct, "systemd-run --unit=writer /bin/sh -c "
              "'i=0; while :; do i=$((i+1)); echo $i >> /var/tmp/log; sync /var/tmp/log; done'")
    wait_for("the writer", lambda: last_number(ct) > 20, timeout=120)
    before = last_number(ct)
    began = time.monotonic()
    _rc, err = qu(ct, "backup", "src", str(BACKUPS))
    seconds = time.monotonic() - began
    after = last_number(ct)
    print(f"full backup: {seconds:.1f} s; {err.strip()}")
    assert re.search(r"full, consistent", err), err  # the agent froze the file systems
    assert after > before  # the guest kept writing through the backup
    points = manifest(ct)["points"]
    assert isinstance(points, list) and len(points) == 1 and points[0]["parent"] is None
    SEEN["full"] = points[0]["id"]
    # Nothing but the point, the manifest and the lock.
    assert sorted(ct.run("ls", "-A", str(BACKUPS)).stdout.split()) == sorted(
        [".lock", "manifest.json", SEEN["full"]])

    _rc, err = qu(ct, "restore", str(BACKUPS), "--as", "copy")
    assert "restored VM copy" in err
    # A live point holds the whole disk: the copy boots from its own base, not src's.
    assert "Image=/var/lib/qemu-run/copy/base.qcow2" in ct.run(
        "cat", "/etc/qemu-run/copy.vm").stdout
    root_fs(ct, "/var/lib/qemu-run/copy/base.qcow2", "/srv/copy-root.raw")
    fsck = ct.run("e2fsck", "-fn", "/srv/copy-root.raw", check=False, timeout=300)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    log = ct.run("debugfs", "-R", "cat /var/tmp/log", "/srv/copy-root.raw").stdout.split()
    numbers = [int(n) for n in log]
    # Whole lines 1..N, N from the moment of the backup (between before and after).
    assert numbers == list(range(1, len(numbers) + 1))
    assert before <= numbers[-1] <= after, (before, numbers[-1], after)
    ct.run("rm", "-f", "/srv/copy-root.raw")


def test_incremental_after_10_mb_is_about_10_mb(ct: Container, src: str) -> None:
    guest(ct, "systemctl stop writer; dd if=/dev/urandom of=/var/tmp/ten bs=1M count=10 "
              "conv=fsync status=none")
    ten = guest(ct, "sha256sum /var/tmp/ten").split()[0]
    _rc, err = qu(ct, "backup", "src", str(BACKUPS))
    print(f"incremental backup: {err.strip()}")
    assert f"incremental from {SEEN['full']}" in err, err
    points = manifest(ct)["points"]
    assert isinstance(points, list) and len(points) == 2
    inc, full = points[1], points[0]
    size = inc["disks"][0]["file"]["size"]
    full_size = full["disks"][0]["file"]["size"]
    print(f"incremental point: {size / 2**20:.1f} MiB (full point {full_size / 2**20:.1f} MiB)")
    assert 10 * 2**20 <= size <= 40 * 2**20
    SEEN["inc"] = inc["id"]
    SEEN["ten"] = ten
    # The chain (full + incremental over the base) restores the file.
    qu(ct, "restore", str(BACKUPS), "--as", "copy2", "--point", inc["id"])
    root_fs(ct, "/var/lib/qemu-run/copy2/base.qcow2", "/srv/copy2-root.raw")
    ct.run("debugfs", "-R", "dump /var/tmp/ten /srv/ten", "/srv/copy2-root.raw")
    assert ct.run("sha256sum", "/srv/ten").stdout.split()[0] == ten
    ct.run("rm", "-f", "/srv/copy2-root.raw", "/srv/ten")


def test_the_backup_boots_on_another_host(ct: Container, src: str) -> None:
    # Another host: a new container with the backup directory and the kernel files the
    # .vm names, nothing else of src (not its base image, state or configuration).
    assert "inc" in SEEN, "needs the incremental point"
    import shutil

    def prepare(upper: Path) -> None:
        for name in ("vmlinuz", "initrd.img"):
            there = upper / DATA.relative_to("/") / name
            there.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ct.upper / DATA.relative_to("/") / name, there)
            there.chmod(0o644)
        shutil.copytree(ct.upper / BACKUPS.relative_to("/"), upper / BACKUPS.relative_to("/"))

    with Container("restore", prepare, stop_timeout=60) as other:
        install_qemu_unit(other, Path(QU["bin"]))
        assert other.run("test", "-e", f"{DATA}/base.qcow2", check=False).returncode != 0
        _rc, err = qu(other, "restore", str(BACKUPS), "--as", "copy", "--point", SEEN["inc"])
        assert "restored VM copy" in err, err
        other.systemctl("daemon-reload")
        start(other, "copy")
        # The full point and the incremental one over it: the file written between them.
        assert guest(other, "sha256sum /var/tmp/ten", "copy").split()[0] == SEEN["ten"]
        numbers = [int(n) for n in guest(other, "cat /var/tmp/log", "copy").split()]
        assert numbers == list(range(1, len(numbers) + 1))
        other.systemctl("stop", "qemu-run@copy.service", timeout=180)
        assert prop(other, "qemu-run@copy.service", "Result") == "success"


def test_corrupted_backup_is_refused(ct: Container) -> None:
    ct.run("cp", "-a", str(BACKUPS), "/srv/corrupt")
    disk = f"/srv/corrupt/{SEEN['inc']}/vda.qcow2"
    ct.run("sh", "-c", f"printf X | dd of={disk} bs=1 seek=$(( $(stat -c %s {disk}) / 2 )) "
                       "conv=notrunc status=none")
    rc, err = qu(ct, "restore", "/srv/corrupt", "--as", "bad", check=False)
    assert rc != 0 and "checksum" in err, err
    assert len(err.strip().splitlines()) <= 2, err
    assert ct.run("test", "-e", "/etc/qemu-run/bad.vm", check=False).returncode != 0
    assert ct.run("test", "-e", "/var/lib/qemu-run/bad", check=False).returncode != 0
    ct.run("rm", "-rf", "/srv/corrupt")


def test_full_target_disk_leaves_the_vm_running_and_no_half_file(ct: Container,
                                                                  src: str) -> None:
    ct.run("mkdir", "-p", str(SMALL))
    ct.run("mount", "-t", "tmpfs", "-o", "size=20M,mode=0755", "tmpfs", str(SMALL))
    rc, err = qu(ct, "backup", "src", str(SMALL), check=False)
    print(f"backup into a 20 MB file system: {err.strip()}")
    assert rc != 0 and "nothing was kept" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert ct.run("ls", "-A", str(SMALL)).stdout.split() == [".lock"]
    assert prop(ct, "qemu-run@src.service", "ActiveState") == "active"
    assert guest(ct, "echo alive").strip() == "alive"
    ct.run("umount", str(SMALL))


def test_checkpoint_survives_a_restart(ct: Container, src: str) -> None:
    ct.systemctl("stop", "qemu-run@src.service", timeout=180)
    start(ct)
    assert "Dropped backup checkpoint" not in runner_log(ct, "src")
    guest(ct, "dd if=/dev/urandom of=/var/tmp/one bs=1M count=1 conv=fsync status=none")
    _rc, err = qu(ct, "backup", "src", str(BACKUPS))
    assert f"incremental from {SEEN['inc']}" in err, err


def test_scheduled_backup_unit_adds_a_point(ct: Container, src: str) -> None:
    timer = "qemu-run-backup@src.timer"
    # The generator links it into timers.target.wants: started at boot, or, for a schedule
    # added on a running host (here: `qemu-unit install` generated it anew after the boot),
    # by starting timers.target again, as the README says.
    assert ct.run("test", "-L", f"/run/systemd/generator/timers.target.wants/{timer}",
                  check=False).returncode == 0
    ct.systemctl("start", "timers.target")
    assert prop(ct, timer, "ActiveState") == "active"
    assert "Sun *-12-24 04:00" in prop(ct, timer, "TimersCalendar")
    before = manifest(ct)["points"]
    assert isinstance(before, list)
    # What the timer starts, started the same way: a oneshot, so this returns when it ends.
    ct.systemctl("start", "qemu-run-backup@src.service", timeout=600)
    assert prop(ct, "qemu-run-backup@src.service", "Result") == "success"
    after = manifest(ct)["points"]
    assert isinstance(after, list) and len(after) == len(before) + 1
    # Incremental from the last point (BackupKeep=7: the chain is not full yet).
    assert after[-1]["parent"] == before[-1]["id"]
    ct.wait_journal(f"backup {after[-1]['id']} of src in {BACKUPS}: incremental",
                    "-u", "qemu-run-backup@src.service", "-o", "cat")


def test_a_host_reboot_keeps_a_guest_process_and_sets_the_clock(ct: Container,
                                                               src: str) -> None:
    # HostShutdown=save with a real OS: a process of the guest lives through the host's
    # reboot, the guest's uptime goes on from the save, and the agent sets its clock.
    pid = guest(ct, "systemd-run --unit=sleeper --quiet sleep infinity && "
                    "systemctl show -P MainPID sleeper").strip()
    assert int(pid) > 1
    boot_id = guest(ct, "cat /proc/sys/kernel/random/boot_id")
    read_before = time.monotonic()
    uptime = float(guest(ct, "cut -d' ' -f1 /proc/uptime"))
    ct.reboot()
    # From here until the start the VM is saved, not running: at least 12 s, long enough
    # that a clock left where it was saved would be seen to lag.
    down = time.monotonic()
    old = runner_log(ct, "src")
    assert "The host is shutting down (HostShutdown=save): saving the VM" in old, old
    time.sleep(12)
    away = time.monotonic() - down
    start(ct)
    log = runner_log(ct, "src")
    assert "Restored VM src from its saved state" in log, log
    assert guest(ct, "cat /proc/sys/kernel/random/boot_id") == boot_id  # the same boot
    assert guest(ct, "cat /proc/$(systemctl show -P MainPID sleeper)/comm").strip() == "sleep"
    assert guest(ct, "systemctl show -P MainPID sleeper").strip() == pid
    after = float(guest(ct, "cut -d' ' -f1 /proc/uptime"))
    elapsed = time.monotonic() - read_before
    # The uptime went on from the save and did not count the time the VM was saved.
    assert uptime < after <= uptime + elapsed - away + 2, (uptime, after, elapsed, away)
    ct.wait_journal("Set the guest clock through the guest agent",
                    "-u", "qemu-run@src.service", "-t", "qemu-unit", "-o", "cat")
    lag = time.time() - float(guest(ct, "date +%s.%N"))
    print(f"\nsaved across a reboot: {elapsed:.0f} s, {away:.0f} s of it saved; uptime "
          f"{uptime:.0f} -> {after:.0f} s; "
          f"clock off by {lag:+.1f} s after the agent set it")
    assert abs(lag) < 5, lag


def test_a_live_snapshot_is_frozen_through_the_agent(ct: Container, src: str) -> None:
    # The busybox guest of test_state_system has no agent: its snapshots are
    # crash-consistent. A real OS with its agent is frozen for the moment of the snapshot.
    _rc, err = qu(ct, "snapshot", "create", "src", "frozen")
    assert "snapshot frozen of src (consistent)" in err, err
    [meta] = json.loads(ct.run(QU["bin"], "snapshot", "list", "src", "--json").stdout)
    assert meta["consistency"] == "consistent", meta
    # Thawed again: a write returns (on a frozen file system it would block).
    assert guest(ct, "timeout 20 sh -c 'echo thawed > /var/tmp/thawed && sync' && "
                     "cat /var/tmp/thawed").strip() == "thawed"
    log = ct.journal("-u", "qemu-run@src.service", "-o", "cat")
    assert "Took snapshot frozen (consistent)" in log, log
    qu(ct, "snapshot", "delete", "src", "frozen")
