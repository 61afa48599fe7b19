"""Many VMs at once under a real systemd (issue 10): 30 started by one `systemctl start` on a
cold capability cache, then the host (the container) shut down with 10 of them running."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support.container import Container
from tests.support.vm import (
    cold_cache,
    console,
    install_qemu_unit,
    memory_kb,
    prop,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

MANY = 30
KEEP = 10  # running when the host shuts down
NAMES = [f"m{i:02d}" for i in range(MANY)]


def prepare(upper: Path) -> None:
    stage_guest(upper)
    for name in NAMES:
        write_vm(upper, name, vm_text("wait"))
    cold_cache(upper)
    # Persistent journal in the upper layer: readable after the container is gone.
    (upper / "var/log/journal").mkdir(parents=True, exist_ok=True)


def offline_journal(directory: Path, unit: str) -> str:
    return subprocess.run(
        ["journalctl", "--no-pager", "-D", str(directory), "-u", unit, "-o", "cat"],
        capture_output=True, text=True, check=False,
    ).stdout


def test_thirty_vms_cold_cache_then_host_shutdown_with_ten(qemu_unit_bin: Path) -> None:
    units = [f"qemu-run@{n}.service" for n in NAMES]
    with Container("many", prepare, stop_timeout=120) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        assert ct.run("ls", "-A", "/var/cache/qemu-run").stdout.strip() == ""
        start = time.monotonic()
        ct.systemctl("start", *units, timeout=600)
        elapsed = time.monotonic() - start
        # systemctl start returns once every unit sent READY=1 (Type=notify).
        states = {u: prop(ct, u, "ActiveState") for u in units}
        assert set(states.values()) == {"active"}, states
        # One probe, by qemu-unit-caps.service; each VM copies its result.
        probes = [n for n in NAMES if "cache is cold: probing" in runner_log(ct, n)]
        assert probes == [], probes
        caps_log = ct.journal("-u", "qemu-unit-caps.service", "-o", "cat")
        assert caps_log.count("cache is cold: probing") == 1, caps_log
        pss = uss = 0
        for u in units:
            p, s = memory_kb(ct, prop(ct, u, "MainPID"))
            pss, uss = pss + p, uss + s
        print(f"STRESS {MANY} VMs, one systemctl start, cold cache: {elapsed:.1f} s; runners' "
              f"PSS {pss / 1024:.1f} MB in all ({pss / 1024 / MANY:.1f} MB per VM), "
              f"USS {uss / 1024 / MANY:.1f} MB per VM")
        for n in NAMES:
            wait_for(f"{n} boot", lambda n=n: "qemu-unit-guest: booted" in console(ct, n),
                     timeout=300)
        ct.systemctl("stop", *units[KEEP:], timeout=600)
        kept = units[:KEEP]
        # systemd's stop timeout is above our ShutdownTimeout= (60 s by default).
        for u in kept:
            assert prop(ct, u, "TimeoutStopUSec") == "1min 10s"
        t = time.monotonic()
        ct.poweroff(timeout=300)
        down = time.monotonic() - t
        journal_dir = ct.upper / "var/log/journal"
        for u in kept:
            out = offline_journal(journal_dir, u)
            assert "qemu-unit-guest: power button pressed" in out, out[-2000:]
            assert "the guest powered off" in out, out[-2000:]
            assert "destroy" not in out.lower(), out[-2000:]
        print(f"STRESS host shutdown with {KEEP} VMs running: {down:.1f} s, "
              "every guest powered off by the power button, none destroyed")
