#!/usr/bin/env python3
"""What the unit's sandbox costs at `systemctl start` and `systemctl stop` (run as root):

    python3 bench/sandbox.py [--rounds N] [--ten | --setup-cpu [--unit FILE]]

One VM (the test guest, TCG, no network) under a real systemd (nspawn), started and
stopped ROUNDS times with the template as installed and with one group of its sandbox
settings switched off by a drop-in, the variants taking turns within each round. The
differences to the full unit are what each group costs; nothing here is a proposal to
drop one (`systemd-analyze security` exposure 0.9 is the unit's).

--ten: ten VMs in one `systemctl start` instead (bench/runner.py's row), as installed,
without the registration, without every sandbox group above, and without either: what
is left is the runner's own part of the ten-VM start.

--setup-cpu: the CPU systemd spends setting up the template's sandbox for one start,
setting by setting: a transient service (`systemd-run`) with the template's [Service]
settings that sandbox the process (not Exec*=, Restart=, timeouts...) runs /bin/sleep; its
cgroup's CPU once sleep runs is the setup (fork, namespaces, mounts, seccomp compilation;
sleep itself costs ~1 ms, as "no sandbox" shows). Then the same without each setting in
turn. Ten VMs starting on two cores pay it ten times. --unit: another unit's settings
(units/qemu-run-register@.service: the root step's).
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

import runner as reference  # noqa: E402  (bench/runner.py: journal cursor, boot wait, settle)

from qemu_unit.config import unitfile  # noqa: E402
from tests.support.container import Container  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import (  # noqa: E402
    install_qemu_unit,
    put_file,
    stage_guest,
    vm_text,
    write_vm,
)

UNIT = "qemu-run@bench"
DROPIN = f"/etc/systemd/system/{UNIT}.service.d/95-bench-sandbox.conf"
VARIANTS = {
    "the unit as installed": "",
    "no seccomp filters (SystemCallFilter=, RestrictAddressFamilies=, Restrict*=, "
    "LockPersonality=, SystemCallArchitectures=)":
        "SystemCallFilter=\nRestrictAddressFamilies=\nRestrictNamespaces=no\n"
        "LockPersonality=no\nRestrictRealtime=no\nRestrictSUIDSGID=no\n"
        "SystemCallArchitectures=\n",
    "no network namespace, no IP firewall (PrivateNetwork=no, IPAddressDeny=)":
        "PrivateNetwork=no\nIPAddressDeny=\n",
    "no user namespace (PrivateUsers=no)": "PrivateUsers=no\n",
    "no kernel/proc protections (Protect{KernelTunables,KernelModules,KernelLogs,"
    "ControlGroups,Clock,Hostname}=no, ProtectProc=default)":
        "ProtectKernelTunables=no\nProtectKernelModules=no\nProtectKernelLogs=no\n"
        "ProtectControlGroups=no\nProtectClock=no\nProtectHostname=no\nProtectProc=default\n",
    # Not a setting of the template: the unit it wants (masked: a drop-in cannot drop a Wants=).
    "no machined registration (qemu-run-register@ masked)": "",
}


REGISTRATION = "no machined registration (qemu-run-register@ masked)"
REGISTER_MASK = "/etc/systemd/system/qemu-run-register@.service"
SANDBOX = "".join(v for k, v in VARIANTS.items() if k not in ("the unit as installed",
                                                             REGISTRATION))
TEN = [f"b{i}" for i in range(10)]
TEN_DROPIN = "/etc/systemd/system/qemu-run@.service.d/95-bench-sandbox.conf"
TEN_VARIANTS = {
    "the unit as installed": "",
    REGISTRATION: VARIANTS[REGISTRATION],
    "none of the sandbox groups above": SANDBOX,
    "neither": SANDBOX + VARIANTS[REGISTRATION],
}


def apply(ct: Container, dropin: str, name: str, settings: str) -> None:
    """Variant NAME: its drop-in, and the registration masked if NAME goes without it."""
    put_file(ct, dropin, f"[Service]\n{settings}")
    ct.run("rm", "-f", REGISTER_MASK)
    if name in (REGISTRATION, "neither"):
        ct.run("ln", "-s", "/dev/null", REGISTER_MASK)
    ct.systemctl("daemon-reload")


def ten(rounds: int) -> int:
    """Ten VMs in one `systemctl start` for each of TEN_VARIANTS (a template drop-in)."""

    def prepare(upper: Path) -> None:
        stage_guest(upper)
        for name in TEN:
            write_vm(upper, name, vm_text("wait"))

    units = [f"qemu-run@{n}" for n in TEN]
    samples: dict[str, list[float]] = {}
    with Container("benchten", prepare) as ct:
        install_qemu_unit(ct, test_install())
        ct.systemctl("daemon-reload")
        cursor = reference.journal_cursor(ct)
        ct.systemctl("start", *units, timeout=300)  # first start: state directories, users
        reference.wait_booted(ct, cursor, units)
        ct.systemctl("stop", *units, timeout=300)
        for _ in range(rounds):
            for name, settings in TEN_VARIANTS.items():
                apply(ct, TEN_DROPIN, name, settings)
                reference.settle()  # the last round's teardown runs into no start
                cursor = reference.journal_cursor(ct)
                t = time.monotonic()
                ct.systemctl("start", *units, timeout=300)
                samples.setdefault(name, []).append(time.monotonic() - t)
                reference.wait_booted(ct, cursor, units)
                ct.systemctl("stop", *units, timeout=300)
    print(f"\nmedians of {rounds} rounds, TCG, ten VMs without network, one systemctl start\n")
    print_medians(samples, "the unit as installed", "ten VMs", "{:.3f} s", "{:+.3f}")
    return 0


def print_medians(samples: dict[str, list[float]], base_name: str, column: str,
                  value_format: str, change_format: str) -> None:
    """A table of each variant's median, and its change against BASE_NAME's."""
    base = statistics.median(samples[base_name])
    print(f"| variant | {column} |")
    print("|---|---|")
    for name, values in samples.items():
        value = statistics.median(values)
        change = "" if name == base_name else f" ({change_format.format(value - base)})"
        print(f"| {name} | {value_format.format(value)}{change} |")


# The [Service] keys that run and supervise the process rather than sandbox it.
NOT_SANDBOX = ("Exec", "Type", "NotifyAccess", "KillMode", "Timeout", "Watchdog", "Restart",
               "Slice", "LogRateLimit", "LogExtraFields", "Environment")
TEMPLATE = REPO / "units/qemu-run@.service"


def template_sandbox(path: Path = TEMPLATE) -> list[str]:
    """KEY=VALUE of every sandbox setting of PATH (a unit file), as written."""
    return [f"{e.key}={e.value}" for e in unitfile.parse(path.read_text(), str(path))
            if e.section == "Service" and not e.key.startswith(NOT_SANDBOX)]


def setup_cpu(rounds: int, unit_file: Path = TEMPLATE) -> int:
    """CPU of one start's sandbox setup, whole and without each setting (see --setup-cpu)."""
    full = template_sandbox(unit_file)
    variants = {"the unit's sandbox": full, "no sandbox": []}
    for setting in full:
        # Without DynamicUser= the template's User= (a dynamic name) does not exist: root.
        gone = ("DynamicUser=", "User=") if setting.startswith("DynamicUser=") else (setting,)
        variants[f"without {setting}"] = [s for s in full if not s.startswith(gone)]
    count = [0]

    def cpu_ms(ct: Container, settings: list[str]) -> float:
        count[0] += 1
        unit = f"qub-setup{count[0]}"
        props = [a for s in settings for a in ("-p", s.replace("%i", unit))]
        ct.run("systemd-run", "--quiet", f"--unit={unit}", "--service-type=exec", *props,
               "/bin/sleep", "60")
        stat = ct.run("sh", "-c", f"cat /sys/fs/cgroup/unified/system.slice/{unit}.service/"
                      f"cpu.stat 2>/dev/null || cat /sys/fs/cgroup/system.slice/{unit}.service/"
                      "cpu.stat").stdout.split()
        ct.systemctl("stop", unit)
        return int(stat[stat.index("usage_usec") + 1]) / 1000

    samples: dict[str, list[float]] = {}
    with Container("benchsetup", lambda upper: None) as ct:
        install_qemu_unit(ct, test_install())  # the template's users and directories
        for _ in range(rounds):
            for name, settings in variants.items():
                samples.setdefault(name, []).append(cpu_ms(ct, settings))
    print(f"\nmedians of {rounds} rounds: CPU of one start's sandbox setup "
          f"({len(full)} settings of {unit_file.relative_to(REPO)})\n")
    print_medians(samples, "the unit's sandbox", "CPU", "{:.1f} ms", "{:+.1f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ten", action="store_true", help="ten VMs in one systemctl start")
    ap.add_argument("--setup-cpu", action="store_true",
                    help="the CPU of the sandbox's setup, setting by setting")
    ap.add_argument("--unit", type=Path, default=TEMPLATE,
                    help="with --setup-cpu: the unit file whose settings (default the template)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/sandbox.py: run as root", file=sys.stderr)
        return 1
    if args.ten:
        return ten(args.rounds)
    if args.setup_cpu:
        return setup_cpu(args.rounds, args.unit.resolve())

    def prepare(upper: Path) -> None:
        stage_guest(upper)
        write_vm(upper, "bench", vm_text("wait"))

    samples: dict[str, list[tuple[float, float]]] = {}
    with Container("benchsbx", prepare) as ct:
        install_qemu_unit(ct, test_install())
        ct.systemctl("daemon-reload")
        cursor = reference.journal_cursor(ct)
        ct.systemctl("start", UNIT)  # warms the capability cache
        reference.wait_booted(ct, cursor, [UNIT])
        ct.systemctl("stop", UNIT)
        for _ in range(args.rounds):
            for name, settings in VARIANTS.items():
                apply(ct, DROPIN, name, settings)
                cursor = reference.journal_cursor(ct)
                t = time.monotonic()
                ct.systemctl("start", UNIT)
                start = time.monotonic() - t
                reference.wait_booted(ct, cursor, [UNIT])
                t = time.monotonic()
                ct.systemctl("stop", UNIT)
                samples.setdefault(name, []).append((start, time.monotonic() - t))
    full = samples["the unit as installed"]
    base = (statistics.median(s for s, _ in full), statistics.median(s for _, s in full))
    print(f"\nmedians of {args.rounds} rounds, TCG, one VM without network\n")
    print("| variant | systemctl start | systemctl stop |")
    print("|---|---|---|")
    for name, values in samples.items():
        start = statistics.median(s for s, _ in values)
        stop = statistics.median(s for _, s in values)
        if values is full:
            print(f"| {name} | {start:.3f} s | {stop:.3f} s |")
        else:
            print(f"| {name} | {start:.3f} s ({start - base[0]:+.3f}) | "
                  f"{stop:.3f} s ({stop - base[1]:+.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
