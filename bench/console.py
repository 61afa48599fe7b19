#!/usr/bin/env python3
"""Console benchmark, in one run, against the reference (run as root; TCG; under the lock).

    python3 bench/console.py [--lines N]

The test guest prints N two-character lines (default 300,000) as fast as it can:
- reference: bare QEMU, its serial console on stdout read by a Python thread;
- qemu-run@flood.service under a real systemd (nspawn) with journald running, every
  line meant for the journal (ConsoleRateLimitIntervalSec=0);
- the same with journald SIGSTOPped before the start (resumed after the flood, and
  after at most 150 s: journald's own watchdog is 3 min).
For each: the console's throughput from `booted` to `FLOOD-END` (kB/s, ratio to bare
QEMU) and, under the unit, the runner's VmRSS at boot and its peak during the flood.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.container import Container  # noqa: E402
from tests.support.guest import bare_qemu  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import (  # noqa: E402
    install_qemu_unit,
    prop,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

LOG = "/var/log/qemu-run/flood/console.log"
STOPPED_AT_MOST = 150.0


def bare(lines: int) -> float:
    """Seconds from `booted` to FLOOD-END under bare QEMU."""
    with bare_qemu("flood", f"qemu_unit.lines={lines}", "qemu_unit.text=short") as vm:
        vm.wait_for("qemu-unit-guest: booted", timeout=120)
        start = time.monotonic()
        vm.wait_for("FLOOD-END", timeout=600)
        return time.monotonic() - start


def rss(ct: Container, pid: str) -> int:
    found = re.search(r"^VmRSS:\s+(\d+) kB", ct.run("cat", f"/proc/{pid}/status").stdout, re.M)
    assert found
    return int(found.group(1)) * 1024


def under_unit(ct: Container, stop_journald: bool) -> dict[str, float]:
    unit = "qemu-run@flood.service"
    ct.run("rm", "-f", LOG)
    journald = prop(ct, "systemd-journald.service", "MainPID")
    if stop_journald:
        ct.run("kill", "-STOP", journald)
    try:
        ct.systemctl("start", "--no-block", unit)
        wait_for("booted", lambda: "qemu-unit-guest: booted" in ct.run(
            "cat", LOG, check=False).stdout, timeout=120)
        pid = prop(ct, unit, "MainPID")
        start = time.monotonic()
        base = peak = rss(ct, pid)
        bytes_at_boot = int(ct.run("stat", "-c", "%s", LOG).stdout)

        def done() -> bool:
            nonlocal peak
            peak = max(peak, rss(ct, pid))
            return ("FLOOD-END" in ct.run("tail", "-c", "200", LOG).stdout
                    or stop_journald and time.monotonic() - start > STOPPED_AT_MOST)

        wait_for("FLOOD-END", done, timeout=900)
        seconds = time.monotonic() - start
        size = int(ct.run("stat", "-c", "%s", LOG).stdout) - bytes_at_boot
    finally:
        if stop_journald:
            ct.run("kill", "-CONT", journald, check=False)
    ct.systemctl("stop", unit)
    return {"seconds": seconds, "kBps": size / seconds / 1000, "rss": base, "peak": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=300_000)
    args = parser.parse_args()
    size = args.lines * len("ab\r\n")
    reference = size / bare(args.lines) / 1000
    print(f"bare QEMU: {args.lines} two-character lines at {reference:.0f} kB/s")

    def prepare(upper: Path) -> None:
        stage_guest(upper)
        write_vm(upper, "flood", vm_text(
            "flood", vm="ConsoleRateLimitIntervalSec=0",
            cmdline_extra=f"qemu_unit.lines={args.lines} qemu_unit.text=short"))

    with Container("bench-console", prepare) as ct:
        install_qemu_unit(ct, test_install())
        for stopped in (False, True):
            r = under_unit(ct, stopped)
            label = "journald stopped" if stopped else "journald running"
            print(f"unit, {label}: {r['kBps']:.0f} kB/s ({r['kBps'] / reference:.2f}x bare "
                  f"QEMU) over {r['seconds']:.0f} s; runner VmRSS {r['rss'] / 2**20:.1f} MiB "
                  f"at boot, peak {r['peak'] / 2**20:.1f} MiB "
                  f"(+{(r['peak'] - r['rss']) / 2**20:.1f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
