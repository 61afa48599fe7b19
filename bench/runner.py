#!/usr/bin/env python3
"""Runner benchmark, in one run, against the references (run as root; TCG; warm caches).

    python3 bench/runner.py [--rounds N]

- start -> READY=1 of `qemu-unit run` vs. a bare libvirt-python createXML and
  `virt-qemu-run` (its "guest running"), each from process spawn, same domain;
- stop latency with a cooperative guest: SIGTERM -> runner exit vs. the bare
  script's ACPI request -> STOPPED event (the guest's own power-off);
- the runner's RSS once the VM runs, and the CPU its process has used at READY=1 (the bare
  script's at CREATED): on a busy host, what a start costs the others;
- under a real systemd (nspawn): `systemctl start` -> active, `systemctl stop`, and ten VMs
  in one `systemctl start`, each against the same bare libvirt-python script run as a
  plain `Type=notify` service (`bare-ref@.service`: READY=1 after createXML, SIGTERM ->
  ACPI power button -> exit on STOPPED): the floor systemd, libvirt and QEMU set. For the
  ten, also the CPU their runners (sandbox setup before the exec included) and their QEMUs
  have used once all are active: ten starts on two cores are a CPU budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qemu_unit import paths  # noqa: E402
from qemu_unit.config import settings, source  # noqa: E402
from qemu_unit.vm import domain, host  # noqa: E402
from tests.support.container import Container  # noqa: E402
from tests.support.guest import build_test_guest, cmdline  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import (  # noqa: E402
    install_qemu_unit,
    put_file,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

BASE = Path("/var/lib/qemu-unit-bench")
AS_USER = ["setpriv", "--reuid=qemu-run", "--regid=qemu-run", "--init-groups"]
BOOTED = "qemu-unit-guest: booted"  # printed once the guest listens to the power button
BOOT_WAIT = 4.0
# The runner's trace points (log.trace), in order.
# The last of each is the bench's own: READY=1 received, the process gone.
START_PHASES = ("main", "imported", "planned", "connected", "listening", "created", "ready",
                "notified")
STOP_PHASES = ("stop-requested", "shutdown-asked", "guest-shutdown", "guest-stopped",
               "unwinding", "console-closed", "connection-closed", "exit", "exited")
SYSTEMD_ROWS = {
    "systemctl start": "systemctl start -> active",
    "systemctl stop": "systemctl stop, cooperative guest",
    "ten VMs": "ten VMs, one systemctl start (idle host, median of the later rounds)",
    "ten VMs, first": "ten VMs, their first start",
}


def plain_service(description: str, lines: str) -> str:
    """A Type=notify service as the static qemu-run user, nothing of the VM template's sandbox:
    the references below differ only in their directories and ExecStart=."""
    return (f"[Unit]\nDescription={description} %i\n[Service]\nType=notify\n"
            f"NotifyAccess=main\nUser=qemu-run\nGroup=qemu-run\n{lines}"
            "KillMode=mixed\nSlice=machine.slice\n")


# The reference service: the bare script under systemd, nothing of qemu-unit. A state
# directory per instance keeps each embed root's capability cache warm between rounds.
BARE_UNIT = plain_service("bare libvirt-python reference", (
    "StateDirectory=qub-bare/%i\nEnvironment=HOME=/var/lib/qub-bare/%i\n"
    "ExecStart=/usr/bin/python3 {script} /var/lib/qub-bare/%i {base}/bare-%i.xml {sock}\n"))
# A diagnostic: qemu-unit's runner as a plain service, without the template's sandbox
# (DynamicUser=, namespaces, system call filter): ours minus this is what the sandbox costs.
PLAIN_UNIT = plain_service("qemu-unit's runner without the template's sandbox", (
    "StateDirectory=qub-plain/%i\nRuntimeDirectory=qub-plain/%i\nLogsDirectory=qub-plain/%i\n"
    "ExecStart={qemu_unit} -v run %i\n"))
PHASE_TEXT = {
    "main": "interpreter start, `qemu_unit.cli` imports",
    "imported": "runner imports (libvirt, vm.*)",
    "planned": "load the .vm, host plan, domain tree",
    "connected": "prepare the root, open qemu:///embed",
    "listening": "console and control sockets",
    "created": "createXML (QEMU starts)",
    "ready": "status file, READY=1 sent",
    "stop-requested": "SIGTERM reaches the main loop",
    "shutdown-asked": "ACPI power button pressed",
    "guest-shutdown": "guest powers off (SHUTDOWN event)",
    "guest-stopped": "QEMU exits (STOPPED event)",
    "unwinding": "main loop returns",
    "console-closed": "console threads joined",
    "connection-closed": "libvirt connection closed",
    "exit": "rest of the teardown",
    "notified": "READY=1 reaches the notify socket",
    "exited": "interpreter exit",
}  # virt-qemu-run's console is a pty we do not read: wait instead


def cpu_idle(window: float = 0.5) -> float:
    """The share of the host's CPU time that was idle over the next WINDOW seconds."""
    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    a = sample()
    time.sleep(window)
    d = [y - x for x, y in zip(a, sample(), strict=True)]
    return (d[3] + d[4]) / max(1, sum(d))  # idle + iowait


def settle(threshold: float = 0.9, timeout: float = 20) -> None:
    """Until the host is idle, so that what the last round left (ten QEMUs' memory freed,
    journald writing out their consoles, cgroups and namespaces torn down) does not run
    into the next ten-VM start: a host starts its VMs at boot, not right after stopping
    ten. Suspected after a run where the later rounds took 2.146 s and the first 1.890 s;
    with it the next run gave 2.283 s and 2.252 s (2026-12-07 12:07 and 12:15 UTC): the
    spread between runs is larger than the effect, and rounds no longer depend on it."""
    deadline = time.monotonic() + timeout
    while cpu_idle() < threshold and time.monotonic() < deadline:
        pass


def process_cpu(pid: int) -> float:
    """Seconds of CPU PID's process has used so far (utime + stime, all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proc:
    """A child whose output lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.start = time.monotonic()
        self.p = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.cond.notify_all()

    def wait_line(self, text: str, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines:
                    if text in line:
                        return t
                if not self.cond.wait(deadline - time.monotonic()):
                    out = "".join(line for _, line in self.lines)[-3000:]
                    raise RuntimeError(f"no {text!r} within {timeout}s:\n{out}")

    def traces(self) -> dict[str, float]:
        """The runner's `trace PHASE T` lines (qemu-unit -v): PHASE -> T (CLOCK_MONOTONIC)."""
        out: dict[str, float] = {}
        for _, line in self.lines:
            words = line.split()
            if len(words) == 4 and words[1] == "trace":
                out.setdefault(words[2], float(words[3]))
        return out

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


class Notify:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o777)

    def wait(self, key: str, timeout: float = 60) -> float:
        self.sock.settimeout(timeout)
        while True:
            if key in self.sock.recv(4096).decode():
                return time.monotonic()


def setup() -> tuple[Path, settings.VMConfig]:
    subprocess.run(["systemd-sysusers", str(REPO / "units/qemu-unit.sysusers")], check=True)
    shutil.rmtree(BASE, ignore_errors=True)
    (BASE / "cfg").mkdir(parents=True)
    guest = build_test_guest()
    (BASE / "cfg/bench.vm").write_text(
        "[VM]\nMemory=256M\nAccel=tcg\nMachine=pc\nNetwork=none\n"
        f"Kernel={guest.kernel}\nInitrd={guest.initrd}\nKernelCmdline={cmdline('wait')}\n"
    )
    subprocess.run(["chmod", "-R", "a+rX", str(BASE)], check=True)
    subprocess.run(["chown", "-R", "qemu-run:", str(BASE)], check=True)
    return BASE / "cfg", settings.load_vm(source.find_source("bench", [BASE / "cfg"]))


def build_at(vm: settings.VMConfig, root: Path) -> ET.Element:
    """The domain qemu-unit would start, with its sockets under ROOT."""
    dirs = paths.Dirs(state=BASE / "state", root=root, cache=BASE / "cache", logs=BASE / "state")
    return domain.build(vm, host.plan(vm, dirs, accel=settings.Accel.TCG))


def run_qemu_unit(qemu_unit: Path, cfg: Path) -> dict[str, float]:
    notify = Notify(BASE / "notify.sock")
    Path("/run/qub-ours").mkdir(exist_ok=True)
    shutil.chown("/run/qub-ours", "qemu-run", "qemu-run")
    env = {
        "PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(notify.path),
        "STATE_DIRECTORY": str(BASE / "state"), "RUNTIME_DIRECTORY": "/run/qub-ours",
        "CACHE_DIRECTORY": str(BASE / "cache"), "INVOCATION_ID": "bench",
        # The search path as an environment variable: `-v run NAME` is the unit's own
        # command line (a --config-dir would cost argparse, ~3 ms the unit never pays).
        "QEMU_RUN_PATH": str(cfg),
    }
    proc = Proc([*AS_USER, str(qemu_unit), "-v", "run", "bench"], env)
    try:
        ready = notify.wait("READY=1") - proc.start
        cpu = process_cpu(proc.p.pid)
    except TimeoutError:
        proc.p.kill()
        lines = "".join(line for _, line in proc.lines)[-3000:]
        raise RuntimeError(f"no READY=1:\n{lines}") from None
    proc.wait_line(BOOTED)
    rss = proc.rss_kib() / 1024
    t = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    proc.p.wait(60)
    end = time.monotonic()
    notify.sock.close()
    assert proc.p.returncode == 0, "".join(line for _, line in proc.lines)[-2000:]
    traced = proc.traces()
    out = {"ready": ready, "stop": end - t, "rss": rss, "cpu": cpu}
    # Per phase: seconds since the previous one (START_PHASES from spawn, STOP_PHASES
    # from SIGTERM); the last of each ends at READY=1 and at the process's exit.
    for phases, since, until in ((START_PHASES, proc.start, proc.start + ready),
                                 (STOP_PHASES, t, end)):
        for phase in phases:
            at = traced.get(phase, until)
            out[f"phase {phase}"] = at - since
            since = at
    return out


def run_bare(vm: settings.VMConfig) -> dict[str, float]:
    root = "/run/qub-bare"
    Path(root).mkdir(exist_ok=True)
    shutil.rmtree(f"{root}/run", ignore_errors=True)  # no stale domain from an aborted run
    shutil.chown(root, "qemu-run", "qemu-run")
    sock = f"{root}/console.sock"
    xml_path = BASE / "bare.xml"
    xml_path.write_text(domain.serialize(build_at(vm, Path(root))))
    xml_path.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": root}
    proc = Proc([*AS_USER, "/usr/bin/python3", str(REPO / "bench/bare_libvirt.py"), root,
                 str(xml_path), sock], env)
    ready = proc.wait_line("CREATED") - proc.start
    cpu = process_cpu(proc.p.pid)
    proc.wait_line(BOOTED)
    rss = proc.rss_kib() / 1024
    t = time.monotonic()
    assert proc.p.stdin is not None
    proc.p.stdin.write("stop\n")
    proc.p.stdin.flush()
    stop = proc.wait_line("STOPPED") - t
    proc.p.wait(30)
    return {"ready": ready, "stop": stop, "rss": rss, "cpu": cpu}


def run_virt_qemu_run(vm: settings.VMConfig) -> dict[str, float]:
    root = Path("/run/qub-vqr")
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/qemu.conf").write_text('stdio_handler = "file"\n')
    subprocess.run(["chown", "-R", "qemu-run:", str(root)], check=True)
    xml_path = BASE / "vqr.xml"
    # No one listens on a console socket here: virt-qemu-run gets a pty instead.
    tree = build_at(vm, root)
    serial = tree.find("devices/serial")
    assert serial is not None
    serial.set("type", "pty")
    serial.remove(serial.find("source"))  # type: ignore[arg-type]
    xml_path.write_text(domain.serialize(tree))
    xml_path.chmod(0o644)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root)}
    proc = Proc([*AS_USER, "virt-qemu-run", "-v", "-r", str(root), str(xml_path)], env)
    ready = proc.wait_line("guest running") - proc.start
    time.sleep(BOOT_WAIT)
    t = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)  # virt-qemu-run destroys the guest: not graceful
    proc.p.wait(30)
    return {"ready": ready, "stop": time.monotonic() - t}


def journal_cursor(ct: Container) -> str:
    out = ct.journal("-n", "0", "--show-cursor")
    return out.rsplit("-- cursor: ", 1)[1].strip()


def journal_phases(ct: Container, cursor: str, unit: str) -> dict[str, float]:
    """One start and stop of UNIT from the journal after CURSOR (__MONOTONIC_TIMESTAMP: when
    journald got each line), in seconds since systemd's "Starting" and "Stopping"."""
    entries = []
    for line in ct.journal("-o", "json", f"--after-cursor={cursor}",
                           "--output-fields=MESSAGE,QEMU_UNIT_TRACE,UNIT,_SYSTEMD_UNIT,_PID,"
                           "OBJECT_SYSTEMD_UNIT").splitlines():
        e = json.loads(line)
        # OBJECT_SYSTEMD_UNIT: qemu-run-register@'s lines, which are about the VM's unit.
        if unit in (e.get("UNIT"), e.get("_SYSTEMD_UNIT"), e.get("OBJECT_SYSTEMD_UNIT")):
            entries.append((int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, e))
    marks: dict[str, float] = {}
    for at, e in entries:
        message = str(e.get("MESSAGE", ""))
        if e.get("_PID") != "1":  # not systemd's own line: the runner's "Started VM ..."
            message = "runner: " + message
        key = e.get("QEMU_UNIT_TRACE") or (
            "systemd: Starting" if message.startswith("Starting ") else
            "systemd: Started (active)" if message.startswith("Started ") else
            "systemd: Stopping" if message.startswith("Stopping ") else
            "systemd: Stopped" if message.startswith("Stopped ") else
            "machined registration done" if message.startswith("runner: Registered with")
            else None)
        if key:
            marks.setdefault(key, at)
    out = {}
    for origin, keys in (("systemd: Starting", ("main", "created", "ready",
                                                "systemd: Started (active)",
                                                "machined registration done")),
                         ("systemd: Stopping", ("stop-requested", "guest-shutdown",
                                                "guest-stopped", "exit",
                                                "systemd: Stopped"))):
        for key in keys:
            if origin in marks and key in marks:
                out[f"{key} (since {origin[9:]})"] = marks[key] - marks[origin]
    return out


def bare_units(vm: settings.VMConfig, names: list[str]) -> str:
    """The reference unit's text; its domain XML per instance under BASE (written before
    the container mounts the host root beneath it)."""
    for n in names:
        root = Path(f"/var/lib/qub-bare/{n}")
        (BASE / f"bare-{n}.xml").write_text(domain.serialize(build_at(vm, root)))
        (BASE / f"bare-{n}.xml").chmod(0o644)
    sock = paths.Dirs(state=BASE, root=Path("/var/lib/qub-bare/%i"), cache=BASE,
                      logs=BASE).console_socket
    return BARE_UNIT.format(script=REPO / "bench/bare_libvirt.py", base=BASE, sock=sock)


def wait_booted(ct: Container, cursor: str, units: list[str]) -> None:
    """Until every unit's guest listens to the power button (the bare script presses it
    once; a guest still booting would miss it and its stop would run into the timeout)."""
    for unit in units:
        wait_for(f"{unit}'s guest boot", lambda u=unit: BOOTED in ct.journal(  # type: ignore
            "-u", u, "-o", "cat", f"--after-cursor={cursor}"), timeout=120)


# Each unit's processes and their CPU so far (utime, stime in ticks), in one shell: the
# container has no CPU accounting of its own (its cgroup v1 controllers are the host's,
# read-only), and the guests keep running while this reads.
TEN_CPU = """for u in "$@"; do
  for p in $(cat /sys/fs/cgroup/unified/machine.slice/$u.service/cgroup.procs 2>/dev/null); do
    read -r stat < /proc/$p/stat || continue
    echo "$u $p $(echo "${stat##*) }" | cut -d' ' -f12,13)"
  done
done"""


def ten_cpu(ct: Container, units: list[str]) -> dict[str, float]:
    """Right after the ten units are active: the seconds of CPU their runners (each unit's
    main process, systemd's sandbox setup before its exec included) and their other
    processes (QEMU) have used, summed over the ten."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"runner": 0.0, "QEMU": 0.0}
    lines = ct.run("sh", "-c", TEN_CPU, "ten-cpu", *(f"{u}" for u in units)).stdout
    mains = {u: ct.systemctl("show", "-P", "MainPID", f"{u}.service").stdout.strip()
             for u in units}
    for line in lines.splitlines():
        unit, pid, utime, stime = line.split()
        out["runner" if pid == mains[unit] else "QEMU"] += (int(utime) + int(stime)) / tick
    return out


def run_systemd(qemu_unit: Path, vm: settings.VMConfig, rounds: int) -> dict[str, float]:
    names = [f"b{i}" for i in range(10)]
    bare_unit = bare_units(vm, ["bench", *names])

    def prepare(upper: Path) -> None:
        stage_guest(upper)
        for n in ("bench", *names):
            write_vm(upper, n, vm_text("wait"))

    out: dict[str, float] = {}
    with Container("bench", prepare) as ct:
        install_qemu_unit(ct, qemu_unit)
        put_file(ct, "/etc/systemd/system/bare-ref@.service", bare_unit)
        put_file(ct, "/etc/systemd/system/plain-ref@.service",
                 PLAIN_UNIT.format(qemu_unit=qemu_unit))
        # The runner's trace lines (-v) for this one VM: the journal lines them up with
        # systemd's own messages on one clock.
        put_file(ct, "/etc/systemd/system/qemu-run@bench.service.d/90-trace.conf",
                 f"[Service]\nExecStart=\nExecStart={qemu_unit} -v run %i\n")
        ct.systemctl("daemon-reload")
        # Warm-up: the host's capability cache, and every reference root's own probe.
        warm = ["qemu-run@bench", *(f"{ref}@{n}" for ref in ("bare-ref", "plain-ref")
                                    for n in ["bench", *names])]
        cursor = journal_cursor(ct)
        ct.systemctl("start", *warm, timeout=300)
        wait_booted(ct, cursor, warm)
        ct.systemctl("stop", *warm, timeout=300)
        samples: dict[str, list[float]] = {}
        phases = []
        for _ in range(rounds):
            for prefix, unit in (("", "qemu-run@bench"), ("bare ", "bare-ref@bench"),
                                 ("plain ", "plain-ref@bench")):
                cursor = journal_cursor(ct)
                t = time.monotonic()
                ct.systemctl("start", unit)
                samples.setdefault(f"{prefix}systemctl start", []).append(time.monotonic() - t)
                wait_booted(ct, cursor, [unit])
                t = time.monotonic()
                ct.systemctl("stop", unit)
                samples.setdefault(f"{prefix}systemctl stop", []).append(time.monotonic() - t)
                if not prefix:
                    phases.append(journal_phases(ct, cursor, f"{unit}.service"))
        # The first start of the ten makes their state directories and users; later
        # rounds start them as a host does at every boot. One sample each was too noisy.
        for _ in range(rounds):
            # The plain runners: what of the ten-VM start is the runner, what the unit.
            for prefix, template in (("", "qemu-run@"), ("bare ", "bare-ref@"),
                                     ("plain ", "plain-ref@")):
                units = [f"{template}{n}" for n in names]
                settle()
                cursor = journal_cursor(ct)
                t = time.monotonic()
                ct.systemctl("start", *units, timeout=300)
                samples.setdefault(f"{prefix}ten VMs", []).append(time.monotonic() - t)
                for kind, seconds in ten_cpu(ct, units).items():
                    samples.setdefault(f"{prefix}ten VMs CPU {kind}", []).append(seconds)
                active = ct.run("systemctl", "is-active", *units, check=False).stdout.split()
                assert active == ["active"] * 10, active
                wait_booted(ct, cursor, units)
                ct.systemctl("stop", *units, timeout=300)
        for key, values in samples.items():
            out[key] = statistics.median(values[1:] if key.endswith("ten VMs") and
                                         len(values) > 1 else values)
        out["ten VMs, first"] = samples["ten VMs"][0]
        for key in phases[0]:
            out[f"journal {key}"] = statistics.median(p[key] for p in phases if key in p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-systemd", action="store_true",
                    help="only the direct runs (no container): for a quick look at the phases")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/runner.py: run as root", file=sys.stderr)
        return 1
    qemu_unit = test_install()
    cfg, vm = setup()
    results: dict[str, list[dict[str, float]]] = {"qemu-unit": [], "libvirt": [], "vqr": []}
    # One discarded warm-up each: every embed root pays its capability probe once.
    runs: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("qemu-unit", lambda: run_qemu_unit(qemu_unit, cfg)),
        ("libvirt", lambda: run_bare(vm)),
        ("vqr", lambda: run_virt_qemu_run(vm)),
    ]
    for i in range(args.rounds + 1):
        for key, fn in runs:
            r = fn()
            if i:
                results[key].append(r)

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    ours, bare, vqr = (med(k, "ready") for k in ("qemu-unit", "libvirt", "vqr"))
    stop_ours, stop_bare, stop_vqr = (med(k, "stop") for k in ("qemu-unit", "libvirt", "vqr"))
    rss, rss_bare = med("qemu-unit", "rss"), med("libvirt", "rss")
    for scratch in ("/run/qub-ours", "/run/qub-bare", "/run/qub-vqr"):
        shutil.rmtree(scratch, ignore_errors=True)  # the direct runs' roots
    sysd = {} if args.no_systemd else run_systemd(qemu_unit, vm, args.rounds)
    print(f"\nmedians of {args.rounds} rounds, TCG, warm capability cache\n")
    print("| measure | qemu-unit | bare libvirt-python | virt-qemu-run | ratio |")
    print("|---|---|---|---|---|")
    print(f"| spawn -> running/READY | {ours:.3f} s | {bare:.3f} s | {vqr:.3f} s "
          f"| {ours / bare:.2f}x libvirt, {ours / vqr:.2f}x virt-qemu-run |")
    print(f"| stop, cooperative guest | {stop_ours:.3f} s | {stop_bare:.3f} s "
          f"| {stop_vqr:.3f} s (destroys) | {stop_ours - stop_bare:+.3f} s over the guest's "
          "own power-off |")
    print(f"| process RSS, VM running | {rss:.1f} MB | {rss_bare:.1f} MB | | "
          f"{rss / rss_bare:.2f}x libvirt |")
    cpu, cpu_bare = med("qemu-unit", "cpu"), med("libvirt", "cpu")
    print(f"| process CPU at READY (user + system) | {cpu:.3f} s | {cpu_bare:.3f} s | | "
          f"{cpu - cpu_bare:+.3f} s |")
    for key, text in SYSTEMD_ROWS.items():
        if key in sysd:
            ref = sysd.get(f"bare {key}")
            tail = (f"{ref:.3f} s (as a service) | | {sysd[key] / ref:.2f}x libvirt |"
                    if ref else "| | |")
            print(f"| {text} | {sysd[key]:.3f} s | {tail}")
            if f"plain {key}" in sysd:
                print(f"| {text}, the runner without the unit's sandbox | "
                      f"{sysd[f'plain {key}']:.3f} s | | | |")
            for kind in ("runner", "QEMU"):
                if f"{key} CPU {kind}" in sysd:
                    print(f"| {text}: CPU of the ten {kind}s once active (plain runner: "
                          f"{sysd[f'plain {key} CPU {kind}']:.2f} s) | "
                          f"{sysd[f'{key} CPU {kind}']:.2f} s | "
                          f"{sysd[f'bare {key} CPU {kind}']:.2f} s | | |")
    print("\nwhere the runner's time goes (`qemu-unit -v run`, its trace lines; medians)\n")
    print("| phase | from the previous point |")
    print("|---|---|")
    for phase in (*START_PHASES, *STOP_PHASES):
        print(f"| {PHASE_TEXT[phase]} | {med('qemu-unit', f'phase {phase}'):.3f} s |")
    for key, value in sysd.items():
        if key.startswith("journal "):
            print(f"| systemd: {key[8:]} | {value:.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
