#!/usr/bin/env python3
"""Cloud image benchmark: `systemctl start` -> SSH answering, vs. bare QEMU (run as root).

    python3 bench/cloud.py [--rounds N]

Both boot the Debian 12 test image (tests/support/debian.py: GPT, systemd-boot, UEFI) from a
fresh qcow2 overlay with the same NoCloud seed (SSH key, host name), the same isolated user
network with the same host forward, 1 GiB, 1 vCPU, TCG. qemu-unit runs it as
qemu-run@bench.service in a real systemd (nspawn) with Ready=agent and is reset before each
round (a first boot with cloud-init each time); bare QEMU is spawned directly. Both have their
base image, overlay and seed on the same storage (the container's tmpfs upper layer). Each
figure is from spawn/`systemctl start` to the first `ssh ... hostname` that answers. Rounds
alternate.

    python3 bench/cloud.py --rounds N --variants

also boots the unit, in every round, with each of what it adds to the guest switched off by a
drop-in of the `.vm` (VARIANTS): the console copied line by line to the journal
(`Console=none`: the serial port is not connected) and readiness from the guest agent
(`Ready=started`: nobody polls the agent while the guest boots); the difference to the unit
as configured is what each costs.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qemu_unit.vm import seed  # noqa: E402
from tests.support.container import Container  # noqa: E402
from tests.support.debian import build_debian_image  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import install_qemu_unit, put_file, write_vm  # noqa: E402

DATA = Path("/srv/qemu-unit-bench")
BENCH_DIR = Path("/var/lib/qemu-unit-bench/cloud")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
HOSTNAME = "bench"
TIMEOUT = 1200.0
VARIANT_DROPIN = "/etc/qemu-run/bench.vm.d/90-variant.conf"
VARIANTS = {
    "Console=none": "[VM]\nConsole=none\n",
    "Ready=started": "[VM]\nReady=started\n",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_cmd(key: Path, port: int) -> list[str]:
    return ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "debian@127.0.0.1", "hostname"]


def wait_ssh(run: list[str], start: float) -> float:
    while time.monotonic() - start < TIMEOUT:
        proc = subprocess.run(run, capture_output=True, text=True, check=False, timeout=60)
        if proc.stdout.strip() == HOSTNAME:
            return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"SSH did not answer within {TIMEOUT} s")


def bare_round(work: Path, key: Path, base: Path) -> float:
    """The same image, seed and network under qemu-system-x86_64 directly; its files in
    WORK, on the same storage as qemu-unit's (the container's tmpfs), over the same BASE."""
    overlay, vars_, iso = work / "bare.qcow2", work / "VARS.fd", work / "seed.iso"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                    "-F", "qcow2", str(overlay)], check=True)
    shutil.copyfile(OVMF_VARS, vars_)
    seed.write_iso(seed.Seed("iid-bench-bare", HOSTNAME, (Path(f"{key}.pub").read_text(),)),
                   iso)
    port = free_port()
    start = time.monotonic()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "1024", "-smp", "1",
         "-nodefaults", "-display", "none", "-serial", "null",
         "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
         "-drive", f"if=pflash,format=raw,file={vars_}",
         "-drive", f"if=virtio,format=qcow2,file={overlay}",
         "-drive", f"if=virtio,format=raw,readonly=on,file={iso}",
         "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
         "-device", "virtio-net-pci,netdev=n0",
         "-device", "virtio-rng-pci"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_ssh(ssh_cmd(key, port), start)
    finally:
        qemu.kill()
        qemu.wait()


def unit_round(ct: Container, key: Path, port: int) -> tuple[float, float]:
    """(systemctl start -> SSH, systemctl start -> active) of qemu-run@bench, first boot."""
    ct.run(str(test_install()), "reset", "bench")
    start = time.monotonic()
    ct.run("systemctl", "start", "--no-block", "qemu-run@bench.service")
    ssh = ["nsenter", "-t", str(ct.leader), "-a", *ssh_cmd(key, port)]
    to_ssh = wait_ssh(ssh, start)
    while ct.run("systemctl", "is-active", "qemu-run@bench", check=False).stdout.strip() \
            != "active":
        time.sleep(0.2)
    ready = ct.run("systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                   "qemu-run@bench").stdout.strip()
    started = ct.run("systemctl", "show", "-P", "InactiveExitTimestampMonotonic",
                     "qemu-run@bench").stdout.strip()
    ct.run("systemctl", "stop", "qemu-run@bench.service", timeout=600)
    return to_ssh, (int(ready) - int(started)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", action="store_true",
                        help="also the unit without the console, without agent readiness")
    args = parser.parse_args()
    image = build_debian_image()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=BENCH_DIR))
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()

    def prepare(upper: Path) -> None:
        data = upper / DATA.relative_to("/")
        data.mkdir(parents=True)
        shutil.copyfile(image.disk, data / "base.qcow2")
        shutil.copyfile(f"{key}.pub", data / "key.pub")
        for p in (data / "base.qcow2", data / "key.pub", data, data.parent):
            p.chmod(0o755 if p.is_dir() else 0o644)
        write_vm(upper, "bench", (
            f"[VM]\nImage={DATA}/base.qcow2\nSSHAuthorizedKey={DATA}/key.pub\n"
            f"PublishPort=127.0.0.1:{port}:22\nReady=agent\n"
            f"Hostname={HOSTNAME}\nFirmware=uefi\nAccel=tcg\nMemory=1G\nRestrictNetwork=yes\n"
            "ShutdownMode=agent acpi\n\n[Service]\nTimeoutStartSec=20min\n"))

    bare: list[float] = []
    unit: list[float] = []
    variants: dict[str, list[float]] = {}
    active: list[float] = []
    try:
        with Container("bench-cloud", prepare, stop_timeout=30) as ct:
            install_qemu_unit(ct, test_install())
            # Like for like: bare QEMU's base, overlay, variables and seed in the same
            # tmpfs as the unit's (the container's upper layer), not on the host's disk.
            bare_work = ct.upper / "srv/bare"
            bare_work.mkdir(parents=True)
            base = ct.upper / DATA.relative_to("/") / "base.qcow2"
            for i in range(args.rounds):
                to_ssh, to_active = unit_round(ct, key, port)
                unit.append(to_ssh)
                active.append(to_active)
                bare.append(bare_round(bare_work, key, base))
                print(f"round {i + 1}: qemu-unit {to_ssh:.1f} s to SSH ({to_active:.1f} s to "
                      f"active), bare QEMU {bare[-1]:.1f} s", flush=True)
                for name, text in VARIANTS.items() if args.variants else ():
                    put_file(ct, VARIANT_DROPIN, text)
                    ct.systemctl("daemon-reload")
                    to_ssh, _ = unit_round(ct, key, port)
                    variants.setdefault(name, []).append(to_ssh)
                    ct.run("rm", "-f", VARIANT_DROPIN)
                    ct.systemctl("daemon-reload")
                    print(f"round {i + 1}: qemu-unit with {name} {to_ssh:.1f} s to SSH",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    u, b = statistics.median(unit), statistics.median(bare)
    print(f"systemctl start -> SSH: qemu-unit {u:.1f} s, bare QEMU {b:.1f} s, ratio {u / b:.2f}x; "
          f"systemctl start -> active (Ready=agent): {statistics.median(active):.1f} s")
    for name, values in variants.items():
        v = statistics.median(values)
        print(f"with {name}: {v:.1f} s to SSH ({v - u:+.1f} s against the unit as configured, "
              f"{v / b:.2f}x bare QEMU)")


if __name__ == "__main__":
    main()
