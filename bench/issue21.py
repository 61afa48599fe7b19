#!/usr/bin/env python3
"""Issue 21's table: every row from the bench that measures it, in one run (run as root).

    flock /run/qemu-unit-vmtests.lock /usr/bin/python3 bench/issue21.py [--out DIR] [--slow]
    /usr/bin/python3 bench/issue21.py --from DIR

Runs the benches one after another (BENCHES; with --slow also SLOW, ~6 min more: the
cloud image's first boot over 3 rounds and 30 VMs' memory). Each one's output is kept as
DIR/NAME.txt, its first line saying the command, the git revision and the UTC times it ran
in. Then it prints the README's table from those files: each row's figure, the reference
the same bench measured in the same run, and the issue's goal. --from prints the table
again from a DIR an earlier run wrote. A row whose bench did not run shows "not run"; the
exit status is 0 when every row that ran meets its goal, 1 otherwise. The table copies no
figure: each cell is read from a bench's own output (the README says which run it was).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"
# NAME -> the bench's arguments (bench/NAME's script first).
BENCHES: dict[str, list[str]] = {
    "runner": ["runner.py", "--rounds", "5"],
    "runner-21": ["runner.py", "--no-systemd", "--rounds", "21"],
    "sandbox-ten": ["sandbox.py", "--ten", "--rounds", "5"],
    "generator": ["generator.py", "--runs", "21", "--counts", "1,100,1000"],
    "imports": ["imports.py"],
    "list": ["list.py", "--rounds", "3"],
}
SLOW: dict[str, list[str]] = {
    "cloud": ["cloud.py", "--rounds", "3"],
    "many": ["many.py"],
}
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def run_all(out: Path, slow: bool) -> None:
    """Each bench in turn, its output (and what ran when) in OUT/NAME.txt."""
    out.mkdir(parents=True, exist_ok=True)
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    for name, args in {**BENCHES, **(SLOW if slow else {})}.items():
        start = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        print(f"bench/issue21.py: {name}: bench/{' '.join(args)} ...", file=sys.stderr,
              flush=True)
        proc = subprocess.run([PYTHON, "-u", str(REPO / "bench" / args[0]), *args[1:]],
                              capture_output=True, text=True)
        end = time.strftime("%H:%M", time.gmtime())
        header = (f"# bench/{' '.join(args)}: git {rev}, {start}-{end} UTC, "
                  f"exit {proc.returncode}\n")
        (out / f"{name}.txt").write_text(header + proc.stdout + proc.stderr)


class Outputs:
    """The benches' outputs in a DIR: table cells and lines, found by their labels."""

    def __init__(self, directory: Path) -> None:
        self.texts = {p.stem: p.read_text() for p in directory.glob("*.txt")}

    def header(self, name: str) -> str | None:
        text = self.texts.get(name)
        return text.splitlines()[0].lstrip("# ") if text else None

    def cells(self, name: str, label: str) -> list[str] | None:
        """The cells after the first, of NAME's markdown row whose first cell is LABEL."""
        for line in self.texts.get(name, "").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and cells[0] == label:
                return cells[1:]
        return None

    def line(self, name: str, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.texts.get(name, ""), re.MULTILINE)


def first_number(cell: str | None) -> float | None:
    m = NUMBER.search(cell or "")
    return float(m.group()) if m else None


Reader = Callable[[Outputs], tuple[float | None, float | None]]
# A goal: a check of (figure, reference), and its words; None for a row without one.
Goal = tuple[Callable[[float, float | None], bool], str] | None


class Row(NamedTuple):
    label: str
    read: Reader  # (figure, reference) from the outputs
    unit: str
    goal: Goal
    difference: bool = False  # the reference column compares by difference, not ratio


def _cells(name: str, label: str, reference: str | None = None) -> Reader:
    """Row LABEL of NAME's table: its first cell after the label, and the reference: the
    next cell, or the first of row REFERENCE when given."""
    def read(o: Outputs) -> tuple[float | None, float | None]:
        cells = o.cells(name, label)
        if cells is None:
            return None, None
        if reference is not None:
            ref = o.cells(name, reference)
            return first_number(cells[0]), first_number(ref[0]) if ref else None
        return first_number(cells[0]), first_number(cells[1]) if len(cells) > 1 else None
    return read


def _lines(name: str, figure: str, reference: str | None = None) -> Reader:
    """From NAME's output: the first group of pattern FIGURE, and the reference: FIGURE's
    second group, or the first of pattern REFERENCE when given."""
    def read(o: Outputs) -> tuple[float | None, float | None]:
        m = o.line(name, figure)
        value = float(m.group(1)) if m else None
        if reference is None:
            return value, float(m.group(2)) if m else None
        r = o.line(name, reference)
        return value, float(r.group(1)) if r else None
    return read


# The generator's row of 1000 files: the median, then (past min, max, CPU and ms per file)
# the I/O-only reference.
_generator = _lines("generator", r"^\s*1000\s+(\S+)(?:\s+\S+){4}\s+(\S+)")
_imports = _lines("imports", r" run: (\S+) ms", r"^bare \(.*\): (\S+) ms")
_cloud = _lines("cloud", r"qemu-unit (\S+) s, bare QEMU (\S+) s")
_uss = _lines("many", r"^\| runners' USS, \d+ VMs \| (\S+) MB per VM \|",
              r"^\| bare libvirt-python service PSS / USS.*\| \S+ MB / (\S+) MB \|")


TEN = "ten VMs, one systemctl start (idle host, median of the later rounds)"


def _ratio(most: float, words: str) -> Goal:
    return (lambda v, r: r is not None and v <= most * r), words


def _at_most(most: float, words: str) -> Goal:
    return (lambda v, _r: v <= most), words


ROWS: list[Row] = [
    Row("spawn -> READY=1, no systemd (runner-21)",
        _cells("runner-21", "spawn -> running/READY"), "s",
        _ratio(1.05, "<= 1.05x bare libvirt-python")),
    Row("stop, cooperative guest, no systemd (runner-21)",
        _cells("runner-21", "stop, cooperative guest"), "s",
        ((lambda v, r: r is not None and v - r <= 0.1), "<= +0.1 s over the guest's power-off"),
        difference=True),
    Row("systemctl start -> active (runner)", _cells("runner", "systemctl start -> active"), "s",
        _at_most(0.35, "<= 0.35 s")),
    Row("systemctl stop, cooperative guest (runner)",
        _cells("runner", "systemctl stop, cooperative guest"), "s", _at_most(0.3, "<= 0.3 s")),
    Row("ten VMs, one systemctl start (runner)", _cells("runner", TEN), "s",
        _at_most(2.0, "<= 2 s")),
    Row("ten VMs, as installed (sandbox-ten)", _cells("sandbox-ten", "the unit as installed"),
        "s", _at_most(2.0, "<= 2 s")),
    Row("ten VMs, no registration, no sandbox groups (sandbox-ten)",
        _cells("sandbox-ten", "neither"), "s", None),
    Row("qemu-unit list, 200 VMs (list)",
        _cells("list", "qemu-unit list", "systemctl list-units (reference)"), "s",
        _at_most(0.3, "<= 0.3 s")),
    Row("generator, 1000 .vm (generator)", _generator, "ms", _at_most(50.0, "<= 50 ms")),
    Row("run up to the VM's lookup (imports)", _imports, "ms", None),
    Row("Debian cloud image, start -> SSH (cloud)", _cloud, "s",
        _ratio(1.05, "<= 1.05x bare QEMU")),
    Row("runner USS per VM (many)", _uss, "MB", _at_most(10.0, "<= 10 MB")),
]


def table(outputs: Outputs) -> bool:
    """Print the table; whether every row that ran meets its goal."""
    print("| measure | qemu-unit | reference, same run | against it | goal | meets it |")
    print("|---|---|---|---|---|---|")
    ok = True
    for row in ROWS:
        value, ref = row.read(outputs)
        words = row.goal[1] if row.goal else ""
        if value is None:
            print(f"| {row.label} | not run | | | {words} | |")
            continue
        verdict = ""
        if row.goal is not None:
            good = row.goal[0](value, ref)
            ok = ok and good
            verdict = "yes" if good else "**no**"
        against = ""
        if ref:
            against = f"{value - ref:+.3f} {row.unit}" if row.difference else f"{value / ref:.2f}x"
        shown_ref = f"{ref:g} {row.unit}" if ref is not None else ""
        print(f"| {row.label} | {value:g} {row.unit} | {shown_ref} | {against} | {words} | "
              f"{verdict} |")
    print()
    for name in [*BENCHES, *SLOW]:
        if (header := outputs.header(name)) is not None:
            print(f"- {name}: {header}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/var/tmp/qemu-unit-issue21"))
    ap.add_argument("--slow", action="store_true", help="also the cloud image and 30 VMs")
    ap.add_argument("--from", dest="source", type=Path, help="only print, from DIR")
    args = ap.parse_args()
    if args.source is None:
        run_all(args.out, args.slow)
    return 0 if table(Outputs(args.source or args.out)) else 1


if __name__ == "__main__":
    sys.exit(main())
