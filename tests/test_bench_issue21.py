"""bench/issue21.py's table: each row read from the benches' own output, as they print it
(lines cut from a real run of each, 2026-12-08), and its goal checked against it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("issue21", REPO / "bench" / "issue21.py")
assert _spec is not None and _spec.loader is not None
issue21 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(issue21)

OUTPUTS = {
    "runner": """\
| spawn -> running/READY | 0.312 s | 0.300 s | 0.258 s | 1.04x libvirt, 1.21x virt-qemu-run |
| systemctl start -> active | {start} s | 0.308 s (as a service) | | 1.22x libvirt |
| systemctl stop, cooperative guest | 0.511 s | 0.504 s (as a service) | | 1.01x libvirt |
| ten VMs, one systemctl start (idle host, median of the later rounds) | 2.353 s | 1.689 s (as a service) | | 1.39x libvirt |
""",  # noqa: E501
    "runner-21": """\
| spawn -> running/READY | {ready} s | 0.268 s | 0.242 s | 1.12x libvirt, 1.24x virt-qemu-run |
| stop, cooperative guest | 2.124 s | 2.084 s | 1.820 s (destroys) | +0.040 s over the guest's own power-off |
""",  # noqa: E501
    "sandbox-ten": """\
| the unit as installed | 2.071 s |
| neither | 1.820 s (-0.251) |
""",
    "generator": """\
 files median ms    min ms    max ms    CPU ms   ms/file  I/O only     ratio
     1     22.27     21.39     25.10     21.83     -0.63      9.75      2.28
  1000     89.22     83.78    100.77    144.86      0.07     30.73      2.90
""",
    "list": """\
| systemctl list-units (reference) | 0.016 s | 1.00x |
| qemu-unit list | 0.201 s | 12.92x |
""",
}


def write(directory: Path, start: str = "0.375", ready: str = "0.301") -> Path:
    for name, text in OUTPUTS.items():
        (directory / f"{name}.txt").write_text(
            f"# bench/{name}.py: git abc1234, 2026-12-08 01:19-01:28 UTC, exit 0\n"
            + text.format(start=start, ready=ready))
    return directory


def rows(out: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_each_row_is_read_from_its_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    ok = issue21.table(issue21.Outputs(write(tmp_path)))
    table = rows(capsys.readouterr().out)
    ready = table["spawn -> READY=1, no systemd (runner-21)"]
    assert ready[:3] == ["0.301 s", "0.268 s", "1.12x"] and ready[-1] == "**no**"
    stop = table["stop, cooperative guest, no systemd (runner-21)"]
    assert stop[2] == "+0.040 s" and stop[-1] == "yes"
    assert table["qemu-unit list, 200 VMs (list)"][:3] == ["0.201 s", "0.016 s", "12.56x"]
    assert table["generator, 1000 .vm (generator)"][:2] == ["89.22 ms", "30.73 ms"]
    assert table["ten VMs, no registration, no sandbox groups (sandbox-ten)"][0] == "1.82 s"
    assert table["runner USS per VM (many)"][0] == "not run"
    assert not ok


def test_the_verdict_follows_the_figures(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    issue21.table(issue21.Outputs(write(tmp_path, start="0.349", ready="0.281")))
    table = rows(capsys.readouterr().out)
    assert table["systemctl start -> active (runner)"][-1] == "yes"
    assert table["spawn -> READY=1, no systemd (runner-21)"][-1] == "yes"  # 1.049x


def test_a_run_says_what_ran_when(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    issue21.table(issue21.Outputs(write(tmp_path)))
    out = capsys.readouterr().out
    assert "- runner-21: bench/runner-21.py: git abc1234, 2026-12-08 01:19-01:28 UTC" in out
    assert "- many:" not in out


def test_the_slow_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path)
    (tmp_path / "cloud.txt").write_text(
        "systemctl start -> SSH: qemu-unit 44.2 s, bare QEMU 45.9 s, ratio 0.96x; "
        "systemctl start -> active (Ready=agent): 30.1 s\n")
    (tmp_path / "many.txt").write_text(
        "| runners' USS, 30 VMs | 15.0 MB per VM |\n"
        "| runner PSS / USS per VM, 10 VMs | 17.9 MB / 15.1 MB |\n"
        "| bare libvirt-python service PSS / USS per VM, 10 VMs (the reference) | "
        "13.2 MB / 11.0 MB |\n")
    issue21.table(issue21.Outputs(tmp_path))
    table = rows(capsys.readouterr().out)
    assert table["Debian cloud image, start -> SSH (cloud)"][:3] == ["44.2 s", "45.9 s", "0.96x"]
    assert table["Debian cloud image, start -> SSH (cloud)"][-1] == "yes"
    assert table["runner USS per VM (many)"][:3] == ["15 MB", "11 MB", "1.36x"]
    assert table["runner USS per VM (many)"][-1] == "**no**"
