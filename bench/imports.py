"""What `qemu-unit run` costs before its first real step, against the floor of any Python
runner that reads a .vm (README, "Where the rest goes").

    /usr/bin/python3 bench/imports.py [--runs N] [TREE...]

TREE: a checkout (or `git archive` of one) to compare; default this one. Each round runs
every TREE in turn, in fresh `/usr/bin/python3 -I` processes:
- imports: -X importtime of importing the CLI and the runner, the -c imports' total;
- process: the wall time of the same imports;
- run: the wall time of `qemu-unit run web` up to where it looks for the VM, under the
  unit: the console script's own code (CONSOLE_SCRIPT: cli.main() and so startup's pause),
  those imports, the reading of argv, log.setup() with stderr as the journal; the search
  path is an empty directory, so it ends there (exit 78);
- the root steps, through the same console script: the wall time of `register-machine web`
  (no $MAINPID: it returns once it has read its command line and set up logging) and
  `guest-firewall stop` of a VM without a table (nft answers "no such table"), what
  systemd runs as root around a start;
and once each reference: what bench/bare_libvirt.py imports (BARE); the floor of any Python
runner that reads a .vm, BARE and `re, enum, typing, pathlib` (FLOOR; typing: records as
NamedTuples, libvirt imports it anyway); and FLOOR with what a runner that logs to the journal
and writes domain XML needs too, `logging` and `xml.etree.ElementTree` (FEATURES). Medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
BARE = "import os, queue, signal, socket, sys, threading, libvirt, sdnotify"
FLOOR = BARE + ", re, enum, typing, pathlib"
FEATURES = FLOOR + ", logging, xml.etree.ElementTree"
REFERENCES = {"bare": BARE, "floor": FLOOR, "features": FEATURES}
IMPORTS = "from qemu_unit.cli import commands; from qemu_unit.vm import runner"
# What pip's console script (/usr/bin/qemu-unit) runs, with ARGV as its command line.
CONSOLE_SCRIPT = ("import re, sys; sys.argv = ['qemu-unit', *{argv!r}];"
                  "from qemu_unit.cli import main; sys.exit(main())")
RUN = CONSOLE_SCRIPT.format(argv=["run", "web"])


def on_path(tree: Path, code: str) -> str:
    return f"import sys; sys.path.insert(0, {os.fspath(tree)!r}); {code}"


def import_total(code: str) -> int:
    """Microseconds: the cumulative times of the imports -c makes (after site's)."""
    err = subprocess.run([PYTHON, "-I", "-X", "importtime", "-c", code], capture_output=True,
                         text=True, check=True).stderr
    total, started = 0, False
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _self, cumulative, name = line.removeprefix("import time:").split("|")
        if name.strip() == "site" and not name.startswith("  "):
            started = True
        elif started and not name.startswith("  "):
            total += int(cumulative)
    return total


def wall(code: str, env: dict[str, str] | None = None, stderr: IO[str] | None = None,
         check: bool = True) -> float:
    started = time.perf_counter()
    subprocess.run([PYTHON, "-I", "-c", code], check=check, env=env, stderr=stderr,
                   stdout=stderr)
    return time.perf_counter() - started


ROOT_STEPS = {
    "register-machine": ["register-machine", "web"],
    "guest-firewall stop": ["guest-firewall", "stop", "qub-imports-none"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("trees", nargs="*", type=Path, default=[REPO])
    args = parser.parse_args()
    # An empty search path: no VM web, so run ends where it looks for it.
    with (open(os.devnull, "w") as null,
          tempfile.TemporaryDirectory(prefix="qemu-unit-bench-") as empty):
        st = os.fstat(null.fileno())
        journal = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                   "QEMU_RUN_PATH": empty}
        results: dict[str, list[float]] = {}
        for round_ in range(args.runs + 3):  # 3 warm-up rounds
            got = {name: wall(code) * 1e3 for name, code in REFERENCES.items()}
            for tree in args.trees:
                got[f"{tree} imports"] = import_total(on_path(tree, IMPORTS)) / 1e3
                got[f"{tree} process"] = wall(on_path(tree, IMPORTS)) * 1e3
                got[f"{tree} run"] = wall(on_path(tree, RUN), env=journal, stderr=null,
                                          check=False) * 1e3
                for step, argv in ROOT_STEPS.items():
                    code = on_path(tree, CONSOLE_SCRIPT.format(argv=argv))
                    got[f"{tree} {step}"] = wall(code, env={"PATH": "/usr/sbin:/usr/bin:/bin"},
                                                 stderr=null, check=False) * 1e3
            for key, value in got.items():
                if round_ >= 3:
                    results.setdefault(key, []).append(value)
    floor = statistics.median(results["floor"])
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.getloadavg()[0]:.2f} load, "
          f"medians of {args.runs}")
    for name, code in REFERENCES.items():
        print(f"{name} (`{code}`): {statistics.median(results[name]):.1f} ms")
    for key, values in results.items():
        if key not in REFERENCES:
            median = statistics.median(values)
            steps = key.endswith(("imports", *ROOT_STEPS))
            ratio = "" if steps else f" ({median / floor:.2f}x the floor)"
            print(f"{key}: {median:.1f} ms{ratio}")


if __name__ == "__main__":
    main()
