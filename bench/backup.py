#!/usr/bin/env python3
"""Live backup throughput against `qemu-img convert` of the same disk, and the size and
time of an incremental point (run as root, under the VM-test lock).

    python3 bench/backup.py [--rounds N] [--fill MB]

One Debian 12 guest (tests/support/debian.py, Image= overlay, direct kernel boot, 1 GiB,
2 vCPUs, TCG) runs as qemu-run@bench.service in a real systemd (nspawn); --fill MB of
random data are written into it first so the overlay holds data of its own. Then, in
alternation, ROUNDS times each: `qemu-unit backup bench DIR --standalone --full` (the
runner's push-mode job, the whole disk flattened, checksums included) against `qemu-img
convert -U -O qcow2` of the same overlay with its base into a file (the same bytes read
and written, no consistency, no checksum); median times and MB/s of the output. Then a
default backup (a difference against the base: the job plus qemu-img convert -B), and an
incremental point after 10 MB written in the guest: its size and time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.container import Container  # noqa: E402
from tests.support.debian import CMDLINE, build_debian_image  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import install_qemu_unit, prop, wait_for, write_vm  # noqa: E402

DATA = Path("/srv/qemu-unit-bench")
UNIT = "qemu-run@bench.service"
OVERLAY = "/var/lib/qemu-run/bench/image.qcow2"


def timed(ct: Container, *cmd: str, timeout: float = 1800) -> tuple[float, str]:
    start = time.monotonic()
    proc = ct.run(*cmd, check=False, timeout=timeout)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return took, str(proc.stderr)


def size(ct: Container, path: str) -> int:
    return int(ct.run("du", "-sb", path).stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fill", type=int, default=300, help="MB written in the guest first")
    args = parser.parse_args()
    image = build_debian_image()
    qu = str(test_install())

    def prepare(upper: Path) -> None:
        data = upper / DATA.relative_to("/")
        data.mkdir(parents=True)
        for src, name in ((image.disk, "base.qcow2"), (image.kernel, "vmlinuz"),
                          (image.initrd, "initrd.img")):
            shutil.copyfile(src, data / name)
            (data / name).chmod(0o644)
        data.chmod(0o755)
        write_vm(upper, "bench", f"""\
[VM]
Image={DATA}/base.qcow2
Kernel={DATA}/vmlinuz
Initrd={DATA}/initrd.img
KernelCmdline={CMDLINE}
Accel=tcg
Memory=1G
CPUs=2
Network=none
Ready=agent
ShutdownMode=agent acpi
ShutdownTimeout=120s

[Service]
TimeoutStartSec=900
""")

    with Container("bench-backup", prepare, stop_timeout=60) as ct:
        install_qemu_unit(ct, Path(qu))
        ct.systemctl("start", "--no-block", UNIT)
        wait_for("ready", lambda: prop(ct, UNIT, "ActiveState") != "activating", timeout=900)
        assert prop(ct, UNIT, "ActiveState") == "active"

        def guest(command: str) -> None:
            timed(ct, qu, "exec", "bench", "--", "sh", "-c", command)

        guest(f"dd if=/dev/urandom of=/var/tmp/fill bs=1M count={args.fill} conv=fsync "
              "status=none")
        backups, plain = [], []
        out = 0
        for n in range(args.rounds):
            took, _ = timed(ct, qu, "backup", "bench", f"/srv/b{n}", "--standalone", "--full")
            backups.append(took)
            out = size(ct, f"/srv/b{n}")
            ct.run("rm", "-rf", f"/srv/b{n}")
            took, _ = timed(ct, "qemu-img", "convert", "-U", "-O", "qcow2", OVERLAY,
                            "/srv/copy.qcow2")
            plain.append(took)
            ct.run("rm", "-f", "/srv/copy.qcow2")
        b, p = statistics.median(backups), statistics.median(plain)
        mb = out / 2**20
        print(f"disk: {mb:.0f} MiB allocated (base + {args.fill} MB written), TCG guest running")
        print(f"qemu-unit backup --standalone --full: median {b:.1f} s ({mb / b:.0f} MiB/s) "
              f"over {args.rounds} runs {[round(x, 1) for x in backups]}")
        print(f"qemu-img convert -U of the same disk: median {p:.1f} s ({mb / p:.0f} MiB/s) "
              f"{[round(x, 1) for x in plain]}")
        print(f"ratio backup/convert: {b / p:.2f}x the time")
        took, _ = timed(ct, qu, "backup", "bench", "/srv/inc")
        full = size(ct, "/srv/inc")
        print(f"default full backup (difference against the base): {took:.1f} s, "
              f"{full / 2**20:.0f} MiB")
        guest("dd if=/dev/urandom of=/var/tmp/ten bs=1M count=10 conv=fsync status=none")
        took, err = timed(ct, qu, "backup", "bench", "/srv/inc")
        points = json.loads(ct.run("cat", "/srv/inc/manifest.json").stdout)["points"]
        inc = points[-1]["disks"][0]["file"]["size"]
        print(f"incremental after 10 MB written: {took:.1f} s, {inc / 2**20:.1f} MiB "
              f"({err.strip()})")
        ct.systemctl("stop", UNIT, timeout=300)


if __name__ == "__main__":
    main()
