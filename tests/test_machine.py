"""Registration with systemd-machined: which calls are made, and when none is."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from qemu_unit.cli import install
from qemu_unit.config import unitfile
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import machine, status

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


class FakeBus:
    def __init__(self, machines: dict[str, dict[str, Any]] | None = None) -> None:
        self.machines = machines or {}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str) -> Any:
        self.calls.append(args)
        if args[0] == "call":
            method = args[4]
            if method == "GetMachine":
                if args[6] not in self.machines:
                    raise QemuUnitError(f"No machine '{args[6]}' known")
                return {"type": "o", "data": [f"/m/{args[6]}"]}
            if method == "UnregisterMachine":
                del self.machines[args[6]]
                return {"type": "o", "data": []}
            if method == "RegisterMachine":
                if args[6] in self.machines:
                    raise QemuUnitError(f"Machine '{args[6]}' already exists")
                self.machines[args[6]] = {"Unit": "qemu-run@web.service", "Leader": int(args[-2])}
                return {"type": "o", "data": [f"/m/{args[6]}"]}
        if args[0] == "get-property":
            return {"type": "?", "data": self.machines[args[2].rsplit("/", 1)[1]][args[4]]}
        raise AssertionError(args)

    def methods(self) -> list[str]:
        return [c[4] for c in self.calls if c[0] == "call"]


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> FakeBus:
    fake = FakeBus()
    monkeypatch.setattr(machine, "_busctl", fake)
    return fake


def test_register_passes_name_uuid_class_and_leader(bus: FakeBus) -> None:
    assert machine.register("web", 4242, UUID) == "/m/web"
    [call] = [c for c in bus.calls if c[4] == "RegisterMachine"]
    assert call[5:8] == ("sayssus", "web", "16")
    assert bytes(int(b) for b in call[8:24]).hex() == UUID.replace("-", "")
    assert call[24:] == ("qemu-unit", "vm", "4242", "")


def test_register_without_uuid_sends_an_empty_id(bus: FakeBus) -> None:
    machine.register("web", 4242, None)
    [call] = [c for c in bus.calls if c[4] == "RegisterMachine"]
    assert call[5:12] == ("sayssus", "web", "0", "qemu-unit", "vm", "4242", "")


def test_stale_registration_of_our_unit_is_replaced(bus: FakeBus) -> None:
    bus.machines["web"] = {"Unit": "qemu-run@web.service", "Leader": 99}
    machine.register("web", 4242, UUID)
    assert bus.methods() == ["RegisterMachine", "GetMachine", "UnregisterMachine",
                             "RegisterMachine"]
    assert bus.machines["web"]["Leader"] == 4242


def test_current_registration_is_kept(bus: FakeBus) -> None:
    bus.machines["web"] = {"Unit": "qemu-run@web.service", "Leader": 4242}
    machine.register("web", 4242, UUID)
    assert bus.methods() == ["RegisterMachine", "GetMachine"]


def test_a_new_name_takes_one_call(bus: FakeBus) -> None:
    assert machine.register("web", 4242, UUID) == "/m/web"
    assert bus.methods() == ["RegisterMachine"]


def test_a_refusal_for_another_reason_is_reported(
    bus: FakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: str) -> Any:
        bus.calls.append(args)
        if args[4] == "RegisterMachine":
            raise QemuUnitError("Access denied")
        raise QemuUnitError(f"No machine '{args[6]}' known")

    monkeypatch.setattr(machine, "_busctl", refuse)
    with pytest.raises(QemuUnitError, match="Access denied"):
        machine.register("web", 4242, UUID)
    assert bus.methods() == ["RegisterMachine", "GetMachine"]


def test_foreign_machine_of_the_same_name_is_left_alone(bus: FakeBus) -> None:
    bus.machines["web"] = {"Unit": "systemd-nspawn@web.service", "Leader": 7}
    with pytest.raises(QemuUnitError, match="taken by systemd-nspawn@web.service"):
        machine.register("web", 4242, UUID)
    assert "UnregisterMachine" not in bus.methods()


@pytest.mark.parametrize(
    ("name", "valid"),
    [("web", True), ("web-1.example", True), ("a_b", True), ("base@inst", False),
     ("a:b", False), ("a..b", False), ("a.", False), ("x" * 65, False)],
)  # fmt: skip
def test_machine_names(name: str, valid: bool) -> None:
    assert machine.is_machine_name(name) is valid


def test_register_from_unit_never_fails(
    bus: FakeBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setenv("MAINPID", "4242")
    assert machine.register_from_unit("base@inst", tmp_path) == 0
    assert bus.calls == [] and "not a valid machine name" in caplog.text
    monkeypatch.delenv("MAINPID")
    assert machine.register_from_unit("web", tmp_path) == 0
    assert bus.calls == [] and "no $MAINPID" in caplog.text
    monkeypatch.setenv("MAINPID", "4242")
    bus.machines["web"] = {"Unit": "other.service", "Leader": 1}
    assert machine.register_from_unit("web", tmp_path) == 0
    assert "taken by other.service" in caplog.text


def test_uuid_comes_from_the_status_file_checked(tmp_path: Path) -> None:
    root = tmp_path / "web"
    root.mkdir()
    assert machine.read_uuid(root) is None
    status.write(root, status.Status(uuid=UUID.upper()))
    assert machine.read_uuid(root) == UUID
    status.write(root, status.Status(uuid="../../etc"))
    assert machine.read_uuid(root) is None


UNITS = Path(__file__).parents[1] / "units"
UNIT = UNITS / "qemu-run@.service"
REGISTER_UNIT = UNITS / "qemu-run-register@.service"
MACHINED_PATH = '"/org/freedesktop/machine1/machine/web"'


def root_step(python: str, instance: str = "web", runtime: Path | None = None) -> list[str]:
    """qemu-run-register@INSTANCE's ExecStart= as systemd runs it: continuation lines joined
    (unitfile.parse), split into words, then each word's specifiers and $$ resolved. With
    RUNTIME, the VMs' runtime directories (/run/qemu-run) are there."""
    rendered = install.render_unit(REGISTER_UNIT.read_text(), "/x/qemu-unit", python)
    value = next(e.value for e in unitfile.parse(rendered, str(REGISTER_UNIT))
                 if e.key == "ExecStart")
    if runtime is not None:
        value = value.replace("/run/qemu-run/", f"{runtime}/")
    return [re.sub(r"%(.)", lambda m: instance if m[1] == "i" else m[1], word)
            .replace("$$", "$") for word in shlex.split(value)]


def fake(bin_dir: Path, name: str, record: Path, answer: str, status: int = 0) -> None:
    """A command NAME on BIN_DIR that writes its arguments, one per line, to RECORD."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {shlex.quote(str(record))}\n"
                      f"echo {shlex.quote(answer)}\nexit {status}\n")
    script.chmod(0o755)


@pytest.fixture
def step(tmp_path: Path) -> Any:
    """Run the root step as systemd would, with systemctl (the VM unit's MainPID 4242),
    busctl and python faked on PATH; returns (its output, busctl's arguments or None, the
    fallback's arguments or None). The fake python prints the $MAINPID it was given."""
    bin_dir, runtime = tmp_path / "bin", tmp_path / "run"
    (runtime / "web").mkdir(parents=True)

    def run(uuid_file: str | None = None, busctl_status: int = 0, make: Any = None,
            leader: str = "") -> tuple[str, list[str] | None, list[str] | None]:
        if uuid_file is not None:
            (runtime / "web" / "uuid").write_text(uuid_file)
        if make is not None:
            make(runtime / "web" / "uuid")
        calls = {n: tmp_path / f"{n}.args" for n in ("busctl", "python", "systemctl")}
        fake(bin_dir, "busctl", calls["busctl"], f"o {MACHINED_PATH}", busctl_status)
        fake(bin_dir, "python", calls["python"], "")
        (bin_dir / "python").write_text((bin_dir / "python").read_text().replace(
            "echo ''", 'echo "fallback MAINPID=$MAINPID"'))
        fake(bin_dir, "systemctl", calls["systemctl"], "4242")
        fake(bin_dir, "machinectl", tmp_path / "machinectl.args", leader, 0 if leader else 1)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
        out = subprocess.run(root_step(str(bin_dir / "python"), runtime=runtime), env=env,
                             text=True, capture_output=True, timeout=30, check=True).stdout
        got = [f.read_text().splitlines() if f.exists() else None for f in calls.values()]
        for f in calls.values():
            f.unlink(missing_ok=True)
        assert got[2] == ["show", "-P", "MainPID", "--", "qemu-run@web.service"]
        return out, got[0], got[1]

    return run


def test_root_step_registers_the_runner_with_the_uuid_it_wrote(step: Any) -> None:
    out, busctl, fallback = step(UUID.replace("-", "") + "\n")
    assert busctl == [
        "--system", "call", *machine.BUS, "RegisterMachine", "sayssus", "web", "16",
        *map(str, uuidlib.UUID(UUID).bytes), machine.SERVICE, machine.CLASS, "4242", "",
    ]
    assert fallback is None
    assert f"Registered with systemd-machined as {MACHINED_PATH} (leader 4242)" in out


@pytest.mark.parametrize("how", ["missing", "not hex", "upper case", "too long", "symlink",
                                 "fifo"])
def test_root_step_registers_without_a_uuid_it_cannot_trust(
    step: Any, tmp_path: Path, how: str
) -> None:
    # The runner is unprivileged and writes the file; root reads it. Whatever is there,
    # the step neither waits (a FIFO), nor follows a link, nor passes on more than 16 bytes.
    good = UUID.replace("-", "")
    target = tmp_path / "elsewhere"
    target.write_text(good)
    makers = {
        "missing": (None, None),
        "not hex": (good[:-1] + "g", None),
        "upper case": (good.upper(), None),
        "too long": (good + "00 1 2 3", None),
        "symlink": (None, lambda p: p.symlink_to(target)),
        "fifo": (None, os.mkfifo),
    }
    content, make = makers[how]
    _out, busctl, fallback = step(content, make=make)
    assert busctl is not None and busctl[7:11] == ["web", "0", machine.SERVICE, machine.CLASS]
    assert fallback is None


def test_root_step_falls_back_to_python_when_machined_refuses(step: Any) -> None:
    # A registration left by the unit's last runner (Restart=), or a name machined does
    # not take: register-machine replaces it or says why.
    out, busctl, fallback = step(UUID.replace("-", ""), busctl_status=1)
    assert busctl is not None
    assert fallback == ["-I", "-m", "qemu_unit", "register-machine", "web"]
    assert "fallback MAINPID=4242" in out and "Registered" not in out


def test_root_step_leaves_the_current_registration_alone(step: Any, tmp_path: Path) -> None:
    # `systemctl start` of the running VM starts the register unit again: machined refuses
    # (the name is taken, by this runner), one machinectl says so, no Python runs.
    out, busctl, fallback = step(UUID.replace("-", ""), busctl_status=1, leader="4242")
    assert busctl is not None and fallback is None
    assert (tmp_path / "machinectl.args").read_text().splitlines() == [
        "show", "--property=Leader", "--value", "--", "web"]
    assert out.strip() == "Already registered with systemd-machined"


def test_root_step_replaces_a_registration_of_another_leader(step: Any) -> None:
    # Restart=: machined still has the last runner as the leader; Python replaces it.
    out, _busctl, fallback = step(UUID.replace("-", ""), busctl_status=1, leader="4141")
    assert fallback == ["-I", "-m", "qemu_unit", "register-machine", "web"]
    assert "Already" not in out


def test_root_step_passes_a_hostile_name_as_one_word(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "busctl", tmp_path / "busctl.args", "", 0)
    fake(bin_dir, "systemctl", tmp_path / "systemctl.args", "4242")
    hostile = "a b;$(touch x)`id`"
    subprocess.run(root_step("/nonexistent/python", hostile, tmp_path),
                   env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, cwd=tmp_path,
                   capture_output=True, timeout=30, check=True)
    args = (tmp_path / "busctl.args").read_text().splitlines()
    assert args[7] == hostile and args[8] == "0" and not (tmp_path / "x").exists()
    assert (tmp_path / "systemctl.args").read_text().splitlines()[-1] == \
        f"qemu-run@{hostile}.service"


def test_installed_units_register_through_this_installation() -> None:
    rendered = install.render_unit(REGISTER_UNIT.read_text(), "/opt/venv/bin/qemu-unit",
                                   "/opt/venv/bin/python")
    assert "exec /opt/venv/bin/python -I -m qemu_unit register-machine" in rendered
    assert "/usr/bin/python3" not in rendered
    template = install.render_unit(UNIT.read_text(), "/opt/venv/bin/qemu-unit")
    assert "Wants=qemu-run-register@%i.service" in template
    assert "ExecStart=/opt/venv/bin/qemu-unit run %i" in template
    assert "/usr/bin/qemu-unit" not in template and "ExecStartPost" not in template


@pytest.mark.parametrize("isolated", [True, False])
def test_the_root_step_ignores_the_vm_users_home(tmp_path: Path, isolated: bool) -> None:
    # The review: the root step (then ExecStartPost=+) ran with the VM user's HOME and user site
    # enabled: a .pth there would run as root. Run the step's Python (machined refused:
    # no bus here), without -I to show the test can fail, with HOME at a planted user site.
    argv = root_step(sys.executable, runtime=tmp_path)
    if not isolated:
        argv[2] = argv[2].replace(" -I -m qemu_unit", " -m qemu_unit")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / ".local" / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    marker = tmp_path / "ran-as-root"
    (site / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w')\n")
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "busctl", tmp_path / "busctl.args", "", 1)
    fake(bin_dir, "systemctl", tmp_path / "systemctl.args", "0")
    # A HOME with a user site; MainPID 0 (the VM stopped), so Python only warns.
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(argv, env=env, cwd="/", capture_output=True, timeout=60, check=False)
    assert (tmp_path / "busctl.args").exists()
    assert marker.exists() is not isolated
