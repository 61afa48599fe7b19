#!/usr/bin/env python3
"""exec/cp through the guest agent vs SSH/scp to the same guest; the runner's CPU with a
health check every 10 s (run as root).

    python3 bench/exec.py [--rounds N] [--size MB] [--idle SECONDS]

One Debian 12 guest (tests/support/debian.py, direct kernel boot, 1 GiB, 2 vCPUs, TCG) runs
as qemu-run@bench.service in a real systemd (nspawn) with SSH published on the host's
loopback and HealthCmd=true every 10 s. Then, alternating: `qemu-unit exec bench true` against
`ssh debian@127.0.0.1 true` (a new connection each time, as a script does), median wall
time; a --size MB file of random bytes pushed and pulled with `qemu-unit cp` against `scp`
(checksums compared), throughput; finally the runner's CPU time (utime+stime of the unit's
main PID) over --idle seconds with nothing but the health checks, as a share of one core.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.container import Container  # noqa: E402
from tests.support.debian import CMDLINE, build_debian_image  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import install_qemu_unit, write_vm  # noqa: E402

DATA = Path("/srv/qemu-unit-bench")
UNIT = "qemu-run@bench.service"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(ct: Container, *cmd: str, timeout: float = 600) -> float:
    start = time.monotonic()
    proc = ct.run(*cmd, check=False, timeout=timeout)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return took


def cpu_seconds(ct: Container, pid: int) -> float:
    fields = ct.run("cat", f"/proc/{pid}/stat").stdout.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / float(ct.run("getconf", "CLK_TCK").stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size", type=int, default=100, help="MB copied each way")
    parser.add_argument("--idle", type=float, default=120.0)
    args = parser.parse_args()
    image = build_debian_image()
    port = free_port()
    qu = str(test_install())

    def prepare(upper: Path) -> None:
        data = upper / DATA.relative_to("/")
        data.mkdir(parents=True)
        for src, name in ((image.disk, "base.qcow2"), (image.kernel, "vmlinuz"),
                          (image.initrd, "initrd.img")):
            shutil.copyfile(src, data / name)
            (data / name).chmod(0o644)
        data.chmod(0o755)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(data / "key")], check=True)
        (data / "key.pub").chmod(0o644)
        write_vm(upper, "bench", (
            f"[VM]\nImage={DATA}/base.qcow2\nEphemeral=yes\nKernel={DATA}/vmlinuz\n"
            f"Initrd={DATA}/initrd.img\nKernelCmdline={CMDLINE}\nSSHAuthorizedKey={DATA}/key.pub\n"
            f"PublishPort=127.0.0.1:{port}:22\nRestrictNetwork=yes\nAccel=tcg\nMemory=1G\n"
            "CPUs=2\nHealthCmd=true\nHealthInterval=10s\nHealthStartPeriod=20min\n"
            "Ready=healthy\nShutdownMode=agent acpi\n\n[Service]\nTimeoutStartSec=20min\n"))

    ssh_opts = ["-i", f"{DATA}/key", "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    ssh = ["ssh", *ssh_opts, "-p", str(port), "debian@127.0.0.1"]
    scp = ["scp", "-q", *ssh_opts, "-P", str(port)]
    with Container("bench-exec", prepare, stop_timeout=60) as ct:
        install_qemu_unit(ct, Path(qu))
        ct.systemctl("start", UNIT, timeout=1800)
        # SSH may need a little longer than the agent (cloud-init writes the key).
        deadline = time.monotonic() + 600
        while ct.run(*ssh, "true", check=False, timeout=120).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("SSH did not answer")
            time.sleep(1)
        exec_times, ssh_times = [], []
        for _ in range(args.rounds):
            exec_times.append(timed(ct, qu, "exec", "bench", "true"))
            ssh_times.append(timed(ct, *ssh, "true"))
        e, s = statistics.median(exec_times), statistics.median(ssh_times)
        print(f"round trip of `true` ({args.rounds} each, median): qemu-unit exec {e * 1000:.0f} "
              f"ms, ssh {s * 1000:.0f} ms, ratio {e / s:.2f}x", flush=True)

        size = args.size * 1000 * 1000
        ct.run("sh", "-c", f"head -c {size} /dev/urandom >/srv/blob")
        local = ct.run("sha256sum", "/srv/blob").stdout.split()[0]
        figures = {}
        for what, cmd in (
            ("qemu-unit cp push", [qu, "cp", "/srv/blob", "bench:/root/blob"]),
            ("scp push", [*scp, "/srv/blob", "debian@127.0.0.1:/home/debian/blob"]),
            ("qemu-unit cp pull", [qu, "cp", "bench:/root/blob", "/srv/blob.cp"]),
            ("scp pull", [*scp, "debian@127.0.0.1:/home/debian/blob", "/srv/blob.scp"]),
        ):
            figures[what] = args.size / timed(ct, *cmd, timeout=3600)
        for copy in ("/srv/blob.cp", "/srv/blob.scp"):
            assert ct.run("sha256sum", copy).stdout.split()[0] == local, copy
        for way in ("push", "pull"):
            q, p = figures[f"qemu-unit cp {way}"], figures[f"scp {way}"]
            print(f"{args.size} MB {way}: qemu-unit cp {q:.1f} MB/s, scp {p:.1f} MB/s, "
                  f"ratio {q / p:.2f}x", flush=True)

        pid = int(ct.systemctl("show", "-P", "MainPID", UNIT).stdout)
        before, start = cpu_seconds(ct, pid), time.monotonic()
        time.sleep(args.idle)
        used = cpu_seconds(ct, pid) - before
        share = 100 * used / (time.monotonic() - start)
        print(f"runner CPU with HealthCmd=true every 10 s: {used:.2f} s in {args.idle:.0f} s = "
              f"{share:.2f} % of one core", flush=True)
        ct.systemctl("stop", UNIT, timeout=300)


if __name__ == "__main__":
    main()
