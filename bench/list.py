#!/usr/bin/env python3
"""`qemu-unit list` with many VMs, against `systemctl list-units` in the same container.

    flock /run/qemu-unit-vmtests.lock python3 bench/list.py [--vms 200] [--running 3] [--rounds 5]

A real systemd (nspawn): VMS `.vm` files, RUNNING of them started; then, in pairs,
`systemctl list-units 'qemu-run@*'` (one D-Bus call: the reference), `qemu-unit list`,
and the one `systemctl show` of every unit's properties that `list` makes. Medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qemu_unit.cli import overview  # noqa: E402
from tests.support.container import Container  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import install_qemu_unit, stage_guest, vm_text, write_vm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--running", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/list.py: run as root", file=sys.stderr)
        return 1
    qemu_unit = test_install()
    names = [f"v{i:03d}" for i in range(args.vms)]

    def prepare(upper: Path) -> None:
        stage_guest(upper)
        for n in names:
            write_vm(upper, n, vm_text("wait"))

    units = [f"qemu-run@{n}.service" for n in names]
    commands = {
        "systemctl list-units (reference)": ["systemctl", "list-units", "--all", "--no-pager",
                                             "qemu-run@*"],
        "qemu-unit list": [str(qemu_unit), "list"],
        "qemu-unit list --json": [str(qemu_unit), "list", "--json"],
        "systemctl show, every unit": ["systemctl", "show", "--timestamp=unix", "-p",
                                       ",".join(overview.PROPERTIES), "--", *units],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    with Container("benchlist", prepare) as ct:
        install_qemu_unit(ct, qemu_unit)
        ct.systemctl("start", *units[:args.running], timeout=300)
        for _ in range(args.rounds + 1):  # the first round warms caches: discarded
            for key, cmd in commands.items():
                t = time.monotonic()
                ct.run(*cmd, timeout=120)
                times[key].append(time.monotonic() - t)
        listed = ct.run(str(qemu_unit), "list").stdout
        assert listed.count("active") >= args.running, listed[-2000:]
        ct.systemctl("stop", *units[:args.running], timeout=300)
    ref = statistics.median(times["systemctl list-units (reference)"][1:])
    print(f"\n{args.vms} VMs ({args.running} running), medians of {args.rounds} rounds, "
          f"each command through nsenter into the container\n")
    print("| command | time | ratio to list-units |")
    print("|---|---|---|")
    for key, values in times.items():
        med = statistics.median(values[1:])
        print(f"| {key} | {med:.3f} s | {med / ref:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
