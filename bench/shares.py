#!/usr/bin/env python3
"""Share= benchmark, in one run, against the same work on the host (run as root).

    sudo /usr/bin/python3 bench/shares.py [--files N] [--mib N]

Under a real systemd (nspawn over the host root), a VM with one Share= (its virtiofsd
companion unit, as qemu-run@NAME starts it) runs a tiny guest that, through the share:
writes a file of --mib MiB (dd from /dev/zero, bs=1M, conv=fsync), drops its page
cache and reads the file back (bs=1M), and runs `find` over --files small files. The
same three steps run on the host, in the container, on the same directory. Guest
timings come from the guest's /proc/uptime (TCG: the guest's clock is the host's).
The container's directory is on its overlay's tmpfs: the host side never waits for a
disk, so the ratios are virtio-fs plus TCG, not storage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qemu_unit.cli import demo  # noqa: E402
from tests.support.container import Container  # noqa: E402
from tests.support.guest import build_test_guest  # noqa: E402
from tests.support.venv import test_install  # noqa: E402
from tests.support.vm import GUEST_DIR, install_qemu_unit, write_vm  # noqa: E402

SHARE = Path("/srv/qemu-unit-bench-share")
CACHE = Path("/var/tmp/qemu-unit-tests/bench-shares")
MODULES = ("button", "evdev", "virtio_pci", "virtiofs")
BENCH_INIT = r"""#!/bin/sh
. /lib/guest.sh
say() { echo "qemu-unit-guest: $*"; }
now() { read t _ </proc/uptime; echo "$t"; }
mkdir -p /mnt/s
mount -t virtiofs bench /mnt/s || say "mount failed"
mib=$(cmdline_arg qemu_unit.mib)
t0=$(now); dd if=/dev/zero of=/mnt/s/big bs=1M count="$mib" conv=fsync 2>/dev/null; t1=$(now)
say "write $t0 $t1"
echo 3 >/proc/sys/vm/drop_caches
t0=$(now); dd if=/mnt/s/big of=/dev/null bs=1M 2>/dev/null; t1=$(now)
say "read $t0 $t1"
t0=$(now); n=$(find /mnt/s/files | wc -l); t1=$(now)
say "find $n $t0 $t1"
say "bench done"
if wait_power_button; then :; fi
poweroff -f
"""


def host_side(ct: Container, mib: int) -> dict[str, float]:
    """The same steps on the host, in the container, on the share's directory."""
    script = (
        "import os, subprocess, time\n"
        f"d = '{SHARE}'\n"
        "t = time.monotonic()\n"
        f"subprocess.run(['dd', 'if=/dev/zero', 'of=' + d + '/big-host', 'bs=1M', 'count={mib}',"
        " 'conv=fsync', 'status=none'], check=True)\n"
        "w = time.monotonic() - t\n"
        "t = time.monotonic()\n"
        "subprocess.run(['dd', 'if=' + d + '/big-host', 'of=/dev/null', 'bs=1M', 'status=none'],"
        " check=True)\n"
        "r = time.monotonic() - t\n"
        "t = time.monotonic()\n"
        "n = subprocess.run(['find', d + '/files'], check=True, capture_output=True)"
        ".stdout.count(b'\\n')\n"
        "f = time.monotonic() - t\n"
        "os.unlink(d + '/big-host')\n"
        "print(w, r, f, n)\n"
    )
    w, r, f, n = ct.run("/usr/bin/python3", "-c", script, timeout=600).stdout.split()
    return {"write": float(w), "read": float(r), "find": float(f), "entries": float(n)}


def guest_side(ct: Container) -> dict[str, float]:
    unit = "qemu-run@bench.service"
    ct.systemctl("start", unit, timeout=120)
    invocation = ct.systemctl("show", "-P", "InvocationID", unit).stdout.strip()
    out = ct.wait_journal("qemu-unit-guest: bench done", "-u", unit, "-t", "qemu-unit-console",
                          f"_SYSTEMD_INVOCATION_ID={invocation}", "-o", "cat", timeout=1800)
    ct.systemctl("stop", unit, timeout=120)
    result: dict[str, float] = {}
    for line in out.splitlines():
        words = line.removeprefix("qemu-unit-guest: ").split()
        if words and words[0] in ("write", "read"):
            result[words[0]] = float(words[2]) - float(words[1])
        elif words and words[0] == "find":
            result["entries"] = float(words[1])
            result["find"] = float(words[3]) - float(words[2])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    guest = demo.build_guest(CACHE, BENCH_INIT, modules=MODULES)
    base = build_test_guest()  # for its kernel command line
    qemu_unit = test_install()

    def prepare(upper: Path) -> None:
        files = upper / SHARE.relative_to("/") / "files"
        files.mkdir(parents=True)
        for i in range(args.files):
            (files / f"f{i:05}").write_text(f"{i}\n")
        dest = upper / GUEST_DIR.relative_to("/")
        dest.mkdir(parents=True, exist_ok=True)
        for src, name in ((guest.kernel, "vmlinuz"), (guest.initrd, "bench-initrd.img")):
            (dest / name).write_bytes(src.read_bytes())
            (dest / name).chmod(0o644)
        write_vm(upper, "bench", (
            "[VM]\nMemory=512M\nAccel=tcg\nMachine=pc\nNetwork=none\n"
            f"Kernel={GUEST_DIR}/vmlinuz\nInitrd={GUEST_DIR}/bench-initrd.img\n"
            f"KernelCmdline={base.cmdline} no_timer_check qemu_unit.mib={args.mib}\n"
            f"Share={SHARE}:bench\n"
        ))

    with Container("bench-shares", prepare) as ct:
        install_qemu_unit(ct, qemu_unit)
        started = time.monotonic()
        vm = guest_side(ct)
        ct.run("rm", "-f", f"{SHARE}/big")
        host = host_side(ct, args.mib)
        wall = time.monotonic() - started
    if vm.get("entries") != host["entries"]:
        print(f"find saw {vm.get('entries')} entries in the guest, {host['entries']} on the host")
        return 1
    print(f"Share= through virtio-fs (TCG guest, virtiofsd cache=auto) vs the host, "
          f"{args.mib} MiB, {args.files} files; {wall:.0f} s in all")
    print("| step | guest | host | ratio |\n|---|---|---|---|")
    for step, what in (("write", f"write {args.mib} MiB (fsync)"),
                       ("read", f"read {args.mib} MiB"),
                       ("find", f"find over {args.files} files")):
        g, h = vm[step], host[step]
        rate = (f" ({args.mib / g:.0f} vs {args.mib / h:.0f} MiB/s)"
                if step != "find" else "")
        print(f"| {what}{rate} | {g:.2f} s | {h:.2f} s | {g / h:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
