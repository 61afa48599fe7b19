#!/usr/bin/env python3
"""Many VMs under a real systemd (nspawn), TCG (run as root):

    python3 bench/many.py [--vms 30] [--memory-vms 10]

- N VMs started by one `systemctl start` on a cold capability cache: wall time until
  every unit is active (READY=1), and the runners' PSS/USS summed;
- per-VM memory of the runner with M VMs running (warm cache): PSS and USS
  (private clean + dirty) from /proc/PID/smaps_rollup. PSS shares the libvirt and
  Python pages between the runners, so it falls as VMs are added; USS does not;
- the reference, in the same container: M of bench/runner.py's bare libvirt-python
  services (`import libvirt`, the embed driver, createXML of the same domain), whose USS
  is the floor of any Python process holding a VM through libvirt's embedded driver.
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
sys.path.insert(0, str(REPO / "bench"))

import runner as reference  # noqa: E402  (bench/runner.py: the bare service)

from tests.support.container import Container  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import (  # noqa: E402
    cold_cache,
    install_qemu_unit,
    memory_kb,
    prop,
    put_file,
    stage_guest,
    vm_text,
    write_vm,
)


def measure(ct: Container, units: list[str]) -> tuple[list[int], list[int]]:
    mem = [memory_kb(ct, prop(ct, u, "MainPID")) for u in units]
    return [p for p, _ in mem], [u for _, u in mem]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=30)
    ap.add_argument("--memory-vms", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/many.py: run as root", file=sys.stderr)
        return 1
    names = [f"v{i:02d}" for i in range(max(args.vms, args.memory_vms))]
    _, vm = reference.setup()
    bare = names[: args.memory_vms]
    bare_unit = reference.bare_units(vm, bare)

    def prepare(upper: Path) -> None:
        stage_guest(upper)
        for n in names:
            write_vm(upper, n, vm_text("wait"))
        cold_cache(upper)

    with Container("benchmany", prepare, stop_timeout=120) as ct:
        install_qemu_unit(ct, test_install())
        units = [f"qemu-run@{n}.service" for n in names[: args.vms]]
        t = time.monotonic()
        ct.systemctl("start", *units, timeout=900)
        cold = time.monotonic() - t
        pss, uss = measure(ct, units)
        ct.systemctl("stop", *units, timeout=900)
        some = [f"qemu-run@{n}.service" for n in names[: args.memory_vms]]
        ct.systemctl("start", *some, timeout=900)
        time.sleep(10)  # the guests boot; the runners settle
        pss_m, uss_m = measure(ct, some)
        ct.systemctl("stop", *some, timeout=900)
        put_file(ct, "/etc/systemd/system/bare-ref@.service", bare_unit)
        ct.systemctl("daemon-reload")
        refs = [f"bare-ref@{n}.service" for n in bare]
        cursor = reference.journal_cursor(ct)
        ct.systemctl("start", *refs, timeout=900)
        reference.wait_booted(ct, cursor, refs)
        time.sleep(10)  # as for the runners above
        pss_b, uss_b = measure(ct, refs)
        ct.systemctl("stop", *refs, timeout=900)
    mb = 1024
    print("\n| measure | value |\n|---|---|")
    print(f"| {args.vms} VMs, one systemctl start, cold cache | {cold:.1f} s |")
    print(f"| runners' PSS, {args.vms} VMs | {sum(pss) / mb:.1f} MB in all, "
          f"{sum(pss) / mb / args.vms:.1f} MB per VM |")
    print(f"| runners' USS, {args.vms} VMs | {statistics.median(uss) / mb:.1f} MB per VM |")
    print(f"| runner PSS / USS per VM, {args.memory_vms} VMs | "
          f"{sum(pss_m) / mb / args.memory_vms:.1f} MB / "
          f"{statistics.median(uss_m) / mb:.1f} MB |")
    print(f"| bare libvirt-python service PSS / USS per VM, {args.memory_vms} VMs (the "
          f"reference) | {sum(pss_b) / mb / args.memory_vms:.1f} MB / "
          f"{statistics.median(uss_b) / mb:.1f} MB |")
    print(f"| runner USS / reference USS | "
          f"{statistics.median(uss_m) / statistics.median(uss_b):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
