#!/usr/bin/env python3
"""Save and restore of a running guest against its cold boot to the same point (run as root).

    python3 bench/state.py [--rounds N]

One Debian 12 guest (tests/support/debian.py, direct kernel boot, 1 GiB, 2 vCPUs, TCG,
Ready=agent, HostShutdown=save) runs as qemu-run@bench.service in a real systemd (nspawn).
Each round: a cold boot (`systemctl start` until READY=1, i.e. the guest agent answers);
`qemu-unit save bench` (returns once the save is complete and the runner has ended); a start
that restores the save until READY=1 (the agent answers again); a plain stop and
`qemu-unit discard-save` leave the next round a cold boot. Medians, and each as a ratio of
the cold boot, in one run. The save's size is the runner's own "Saved VM" line.
"""

from __future__ import annotations

import argparse
import re
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
from tests.support.vm import install_qemu_unit, write_vm  # noqa: E402

DATA = Path("/srv/qemu-unit-bench")
UNIT = "qemu-run@bench.service"


def timed(ct: Container, *cmd: str, timeout: float = 1800) -> float:
    start = time.monotonic()
    proc = ct.run(*cmd, check=False, timeout=timeout)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
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
        write_vm(upper, "bench", (
            f"[VM]\nImage={DATA}/base.qcow2\nKernel={DATA}/vmlinuz\nInitrd={DATA}/initrd.img\n"
            f"KernelCmdline={CMDLINE}\nNetwork=none\nAccel=tcg\nMemory=1G\nCPUs=2\n"
            "Ready=agent\nShutdownMode=agent acpi\nHostShutdown=save\n\n"
            "[Service]\nTimeoutStartSec=20min\n"))

    boots, saves, restores, sizes = [], [], [], []
    with Container("bench-state", prepare, stop_timeout=60) as ct:
        install_qemu_unit(ct, Path(qu))
        for _ in range(args.rounds):
            boots.append(timed(ct, "systemctl", "start", UNIT))
            saves.append(timed(ct, qu, "save", "bench"))
            restores.append(timed(ct, "systemctl", "start", UNIT))
            log = ct.journal("-u", UNIT, "-o", "cat", "-t", "qemu-unit")
            sizes.append(int(re.findall(r"Saved VM bench \((\d+) MiB", log)[-1]))
            assert "Restored VM bench" in log.rsplit("Saved VM bench", 1)[1], "not restored"
            ct.systemctl("stop", UNIT, timeout=600)
            ct.run(qu, "discard-save", "bench")
            print(f"round: cold boot {boots[-1]:.1f} s, save {saves[-1]:.1f} s "
                  f"({sizes[-1]} MiB), restore {restores[-1]:.1f} s", flush=True)
    b, s, r = (statistics.median(x) for x in (boots, saves, restores))
    print(f"1 GiB Debian 12 guest, TCG, {args.rounds} rounds (median): cold boot to ready "
          f"{b:.1f} s; save {s:.1f} s ({statistics.median(sizes):.0f} MiB) = {s / b:.2f}x; "
          f"restore to ready {r:.1f} s = {r / b:.2f}x of the cold boot", flush=True)


if __name__ == "__main__":
    main()
