"""The guest console under the real unit: a flood loses nothing silently; `qemu-unit console`;
a stopped journald holds up neither the console nor the guest, and costs bounded memory.

The test guest's `flood` mode prints 100,000 lines `flood N` as fast as it can
(or empty or two-character lines, `qemu_unit.text=`), then `FLOOD-END`; its `shell`
mode runs a shell on the console (where `flood` does the same on demand).
"""

from __future__ import annotations

import re
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_unit.vm.console import LINE_OVERHEAD, MAX_PENDING_BYTES
from tests.support.container import INSIDE_ENV, Container
from tests.support.terminal import Attached
from tests.support.vm import (
    assert_graceful_stop,
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

FLOOD = 100_000
LIMITED = 20_000
# A deadline, not a measurement: 100,000 lines took 18 s on an idle host, 172 s on a busy one.
FLOOD_DEADLINE = 400
LOGS = Path("/var/log/qemu-run")
DROPPED = re.compile(r"(\d+) console lines were not sent to the journal")
# Two-character lines while journald is stopped: about 4 MB of console, ~50 s under TCG.
STALLED = 1_000_000
# journald's own WatchdogSec= (3 min) would have systemd kill a journald stopped longer.
STOPPED_AT_MOST = 150
# What the runner may grow by besides the queue's cap: the allocator, libvirt, the lines
# in flight when the baseline is read. The uncapped queue grew by ~70 bytes a line.
RSS_SLACK = 8 * 1024**2


def prepare(upper: Path) -> None:
    stage_guest(upper)
    # Everything to the journal: nothing may be missing there.
    write_vm(upper, "flood", vm_text("flood", vm="ConsoleRateLimitIntervalSec=0"))
    # A rate limit (the default is 10,000 lines per 30 s): console.log gets all of them.
    write_vm(upper, "limited", vm_text("flood", vm="ConsoleRateLimitBurst=2000",
                                       cmdline_extra=f"qemu_unit.lines={LIMITED}"))
    write_vm(upper, "shell", vm_text("shell", vm="ConsoleRateLimitIntervalSec=0"))
    # Every line meant for the journal; a short watchdog shows that the runner's main loop
    # stays alive while journald is stopped.
    write_vm(upper, "stalled", vm_text("flood", vm="ConsoleRateLimitIntervalSec=0",
                                       service="WatchdogSec=10s",
                                       cmdline_extra=f"qemu_unit.lines={STALLED} "
                                                     "qemu_unit.text=short"))


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("console", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        yield ct


def file_lines(ct: Container, vm: str) -> list[str]:
    """console.log without its header lines, as the journal would split it."""
    text = ct.run("cat", str(LOGS / vm / "console.log")).stdout
    return [line.rstrip("\r") for line in text.split("\n")
            if not line.startswith("-- qemu-unit: console of ")][:-1]


def wait_shell(ct: Container, unit: str) -> None:
    """Until this start's guest has its shell up (earlier starts said so too)."""
    invocation = prop(ct, unit, "InvocationID")
    ct.wait_journal("qemu-unit-guest: shell ready", "-u", unit,
                    f"_SYSTEMD_INVOCATION_ID={invocation}", "-o", "cat", timeout=120)


def flood_numbers(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("flood ")]


def timestamps(ct: Container, vm: str, first: str, last: str) -> float:
    """Seconds between the journal entries FIRST and LAST of VM's console."""
    out = ct.journal("-u", f"qemu-run@{vm}.service", "-t", "qemu-unit-console",
                     "-o", "short-unix")
    stamps = {}
    for line in out.splitlines():
        stamp, _, rest = line.partition(" ")
        message = rest.split(": ", 1)[-1]
        if message in (first, last) and message not in stamps:
            stamps[message] = float(stamp)
    return stamps[last] - stamps[first]


def run_flood(ct: Container, vm: str) -> None:
    unit = f"qemu-run@{vm}.service"
    ct.systemctl("start", unit)
    try:
        wait_for("FLOOD-END in console.log",
                 lambda: "FLOOD-END" in ct.run("tail", "-c", "200",
                                               str(LOGS / vm / "console.log")).stdout,
                 timeout=FLOOD_DEADLINE)
    finally:
        ct.systemctl("stop", unit)
    assert prop(ct, unit, "Result") == "success"
    assert qemu_pids(ct, vm) == []


def test_flood_reaches_the_journal_complete(ct: Container) -> None:
    run_flood(ct, "flood")
    journal = console(ct, "flood").splitlines()
    assert flood_numbers(journal) == list(range(FLOOD))
    assert "FLOOD-END" in journal
    assert not DROPPED.search(runner_log(ct, "flood"))
    # The file has exactly what the journal has.
    assert file_lines(ct, "flood") == journal
    seconds = timestamps(ct, "flood", "flood 0", "FLOOD-END")
    took = next(line for line in journal if "qemu-unit-guest: flood of" in line)
    print(f"\nflood: {len(flood_numbers(journal))} of {FLOOD} lines + FLOOD-END in the "
          f"journal, {seconds:.1f} s from the first to FLOOD-END in the journal; {took}")


def test_rate_limited_flood_is_counted_and_complete_in_console_log(ct: Container) -> None:
    run_flood(ct, "limited")
    journal = console(ct, "limited").splitlines()
    reports = [int(m.group(1)) for m in DROPPED.finditer(runner_log(ct, "limited"))]
    assert reports, "no journal line says that console lines were dropped"
    assert f"the complete console is in {LOGS}/limited/console.log" in runner_log(ct, "limited")
    copy = file_lines(ct, "limited")
    assert flood_numbers(copy) == list(range(LIMITED))
    assert "FLOOD-END" in copy
    # What the journal has plus what it was told it lacks is everything the guest printed.
    assert len(journal) + sum(reports) == len(copy)
    assert len(journal) >= 2000
    print(f"\nlimited: {len(journal)} lines in the journal, {sum(reports)} reported as not "
          f"sent, {len(copy)} in console.log")


# -- qemu-unit console ---------------------------------------------------------------------


def test_attach_type_a_command_two_terminals_detach(ct: Container, qemu_unit_bin: Path) -> None:
    unit = "qemu-run@shell.service"
    ct.systemctl("start", unit)
    try:
        wait_shell(ct, unit)
        one = Attached(ct, qemu_unit_bin, "shell")
        two = Attached(ct, qemu_unit_bin, "shell", "--read-only")
        try:
            one.expect("Connected to the console of shell; detach with Ctrl-]")
            two.expect("Connected to the console of shell (read-only); detach with Ctrl-]")
            two.type(b"echo typed-$((2+2))-read-only\r")  # must reach nobody
            one.type(b"echo answer-$((6*7))\r")
            one.expect("answer-42")
            two.expect("answer-42")  # both terminals see the guest's output
            assert one.detach() == 0
            # The terminal is as it was before: not raw any more.
            assert termios.tcgetattr(one.slave) == one.saved
            assert two.proc.poll() is None  # the other one is still attached
            assert two.detach() == 0
            assert termios.tcgetattr(two.slave) == two.saved
        finally:
            one.close()
            two.close()
        assert prop(ct, unit, "ActiveState") == "active"
        log = runner_log(ct, "shell")
        assert log.count("Console client attached") == 2
        assert log.count("Console client detached") == 2
    finally:
        ct.systemctl("stop", unit)
    journal = console(ct, "shell").splitlines()
    assert "answer-42" in journal
    assert not any("typed-" in line for line in journal)
    # The journal has exactly what the guest printed, as console.log has it.
    assert file_lines(ct, "shell") == journal


def test_other_users_are_refused_root_and_the_vms_own_user_are_not(
    ct: Container, qemu_unit_bin: Path
) -> None:
    unit = "qemu-run@shell.service"
    ct.systemctl("start", unit)
    try:
        as_nobody = ct.run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           str(qemu_unit_bin), "console", "shell", check=False)
        assert as_nobody.returncode == 1
        assert ("cannot attach to the console of shell: permission denied: only root and the "
                "VM's own user (qemu-vm-shell) may attach") in as_nobody.stderr
        assert len(as_nobody.stderr.strip().splitlines()) == 1
        # The static qemu-run is just another user now (each VM has a user of its own).
        as_static = ct.run("setpriv", "--reuid=qemu-run", "--regid=qemu-run", "--clear-groups",
                           str(qemu_unit_bin), "console", "shell", check=False)
        assert as_static.returncode == 1 and "permission denied" in as_static.stderr
        # The VM's own user attaches (read-only, stdin at EOF: it watches until stopped).
        uid = ct.run("stat", "-c", "%u", f"/proc/{prop(ct, unit, 'MainPID')}").stdout.strip()
        as_qemu_run = ct.run("timeout", "3", "setpriv", f"--reuid={uid}", f"--regid={uid}",
                             "--clear-groups", str(qemu_unit_bin), "console", "shell",
                             "--read-only", check=False, input="")
        assert as_qemu_run.returncode == 124, as_qemu_run.stderr
        assert "Connected to the console of shell (read-only)" in as_qemu_run.stderr
    finally:
        ct.systemctl("stop", unit)
    missing = ct.run(str(qemu_unit_bin), "console", "shell", check=False)
    assert missing.returncode == 1
    assert "VM shell is not running" in missing.stderr


def test_a_stuck_client_is_cut_off_and_the_journal_still_gets_everything(
    ct: Container, qemu_unit_bin: Path
) -> None:
    unit = "qemu-run@shell.service"
    ct.systemctl("start", unit)
    this = invocation(ct, "shell")
    try:
        wait_shell(ct, unit)
        # Attached, then never reads: its stdout is a pipe nobody empties.
        env = [f"{k}={v}" for k, v in INSIDE_ENV.items()]
        stuck = subprocess.Popen(
            ["nsenter", "-t", str(ct.leader), "-a", "env", "-i", *env,
             str(qemu_unit_bin), "console", "shell", "--read-only"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        typist = Attached(ct, qemu_unit_bin, "shell")
        try:
            typist.expect("detach with Ctrl-]")
            wait_for("both attached",
                     lambda: runner_log(ct, "shell", this).count("Console client attached") >= 2)
            start = time.monotonic()
            typist.type(b"flood\r")
            typist.expect("flood 1")
            assert typist.detach() == 0
            wait_for("FLOOD-END in console.log",
                     lambda: "FLOOD-END" in ct.run("tail", "-c", "200",
                                                   str(LOGS / "shell" / "console.log")).stdout,
                     timeout=FLOOD_DEADLINE)
            seconds = time.monotonic() - start
        finally:
            typist.close()
            stuck.kill()
            stuck.wait()
            assert stuck.stdout is not None
            stuck.stdout.close()
        assert "did not keep up with the guest's output" in runner_log(ct, "shell", this)
        assert prop(ct, unit, "ActiveState") == "active"
    finally:
        ct.systemctl("stop", unit)
    journal = console(ct, "shell", this).splitlines()
    assert flood_numbers(journal) == list(range(FLOOD))
    assert "FLOOD-END" in journal
    took = next(line for line in journal if "qemu-unit-guest: flood of" in line)
    print(f"\nstuck client: the guest printed {FLOOD} lines in {seconds:.0f} s; {took}")


# -- a stopped journald ----------------------------------------------------------------------


def rss_bytes(ct: Container, pid: str) -> int:
    found = re.search(r"^VmRSS:\s+(\d+) kB", ct.run("cat", f"/proc/{pid}/status").stdout, re.M)
    assert found, f"no VmRSS for pid {pid}"
    return int(found.group(1)) * 1024


def test_a_stopped_journald_holds_up_neither_the_console_nor_the_guest(ct: Container) -> None:
    """journald SIGSTOPped before the VM starts, the guest printing a million two-character
    lines: console.log keeps getting them, the guest boots and goes on printing, the runner's
    main loop pings its watchdog, and its memory stays within the console queue's cap."""
    unit = "qemu-run@stalled.service"
    console_log = str(LOGS / "stalled" / "console.log")
    journald = prop(ct, "systemd-journald.service", "MainPID")
    ct.run("kill", "-STOP", journald)
    try:
        ct.systemctl("start", "--no-block", unit)
        wait_for("the guest's boot in console.log",
                 lambda: "qemu-unit-guest: booted" in ct.run("cat", console_log,
                                                             check=False).stdout,
                 timeout=120)
        pid = prop(ct, unit, "MainPID")
        started = invocation(ct, "stalled")
        baseline = peak = rss_bytes(ct, pid)
        pinged = int(prop(ct, unit, "WatchdogTimestampMonotonic"))
        start = time.monotonic()

        def flood_ended_or_time_up() -> bool:
            nonlocal peak
            peak = max(peak, rss_bytes(ct, pid))
            return (time.monotonic() - start > STOPPED_AT_MOST
                    or "FLOOD-END" in ct.run("tail", "-c", "200", console_log).stdout)

        wait_for("FLOOD-END in console.log", flood_ended_or_time_up,
                 timeout=STOPPED_AT_MOST + 60)
        seconds = time.monotonic() - start
        printed = int(ct.run("grep", "-c", "^ab", console_log, check=False).stdout)
        size = int(ct.run("stat", "-c", "%s", console_log).stdout)
        # The same runner all along, and its watchdog pings went on (every 5 s).
        assert prop(ct, unit, "MainPID") == pid
        assert prop(ct, unit, "NRestarts") == "0"
        assert int(prop(ct, unit, "WatchdogTimestampMonotonic")) > pinged
    finally:
        ct.run("kill", "-CONT", journald, check=False)
    grew = peak - baseline
    print(f"\nstopped journald: {printed} lines in console.log in {seconds:.0f} s "
          f"({size / seconds / 1000:.0f} kB/s); runner VmRSS {baseline / 2**20:.1f} MiB at "
          f"boot, at most {peak / 2**20:.1f} MiB during the flood (+{grew / 2**20:.1f} MiB)")
    # Far more than the queue holds went by while journald was stopped.
    assert printed >= 3 * MAX_PENDING_BYTES // (len("ab") + LINE_OVERHEAD)
    assert grew <= MAX_PENDING_BYTES + RSS_SLACK
    wait_for("FLOOD-END in console.log",
             lambda: "FLOOD-END" in ct.run("tail", "-c", "200", console_log).stdout,
             timeout=FLOOD_DEADLINE)
    assert ct.run("grep", "-c", "^ab", console_log).stdout.strip() == str(STALLED)
    # journald back: the runner says how many lines the journal did not get.
    wait_for("the runner's count of what the journal did not get",
             lambda: "while the journal did not keep up" in runner_log(ct, "stalled",
                                                                       of=started),
             timeout=60)
    ct.systemctl("stop", unit)
    assert_graceful_stop(ct, "stalled", of=started)
    reports = DROPPED.findall(runner_log(ct, "stalled", of=started))
    journal = console(ct, "stalled", of=started).splitlines()
    assert len(journal) + sum(map(int, reports)) == len(file_lines(ct, "stalled"))
