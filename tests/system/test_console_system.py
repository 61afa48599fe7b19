"""The guest console under the real unit: a flood loses nothing silently; `qemu-unit console`.

The test guest's `flood` mode prints 100,000 lines `flood N` as fast as it can,
then `FLOOD-END`; its `shell` mode runs a shell on the console (where `flood`
does the same on demand).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.vm import (
    console,
    install_qemu_unit,
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
LOGS = Path("/var/log/qemu-run")
DROPPED = re.compile(r"(\d+) console lines were not sent to the journal")


def prepare(upper: Path) -> None:
    stage_guest(upper)
    # Everything to the journal: nothing may be missing there.
    write_vm(upper, "flood", vm_text("flood", vm="ConsoleRateLimitIntervalSec=0"))
    # A rate limit (the default is 10,000 lines per 30 s): console.log gets all of them.
    write_vm(upper, "limited", vm_text("flood", vm="ConsoleRateLimitBurst=2000",
                                       cmdline_extra=f"qemu_unit.lines={LIMITED}"))


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
                 timeout=180)
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
