"""Registration with systemd-machined: which calls are made, and when none is."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qemu_unit.cli import install
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


def test_installed_unit_registers_through_this_installation() -> None:
    text = (Path(__file__).parents[1] / "units" / "qemu-run@.service").read_text()
    rendered = install.render_unit(text, "/opt/venv/bin/qemu-unit", "/opt/venv/bin/python")
    assert ("ExecStartPost=-+/bin/sh -c '/opt/venv/bin/python -I -m qemu_unit "
            "register-machine \"$1\" &' register %i" in rendered)
    assert "ExecStart=/opt/venv/bin/qemu-unit run %i" in rendered
    assert "/usr/bin/qemu-unit" not in rendered and "/usr/bin/python3" not in rendered


@pytest.mark.parametrize("isolated", [True, False])
def test_the_root_step_ignores_the_vm_users_home(tmp_path: Path, isolated: bool) -> None:
    # The review: the root ExecStartPost=+ ran with the VM user's HOME and the user site
    # enabled: a .pth there would run as root. Run the unit's own command line (without
    # -I, to show the test can fail) with HOME pointing at a planted user site.
    text = (Path(__file__).parents[1] / "units" / "qemu-run@.service").read_text()
    rendered = install.render_unit(text, "/x/qemu-unit", sys.executable)
    line = next(ln for ln in rendered.splitlines() if ln.startswith("ExecStartPost="))
    # The step's own command, without the shell that puts it in the background.
    sh, dash_c, script, _argv0, instance = shlex.split(line.split("=", 1)[1].lstrip("-+"))
    assert (sh, dash_c, instance) == ("/bin/sh", "-c", "%i") and script.endswith(" &")
    argv = shlex.split(script.removesuffix(" &").replace('"$1"', "web"))
    if not isolated:
        argv.remove("-I")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = tmp_path / ".local" / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    marker = tmp_path / "ran-as-root"
    (site / "evil.pth").write_text(f"import os; open({str(marker)!r}, 'w')\n")
    # What systemd gives the step: the VM user's HOME; no $MAINPID, so it only warns.
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run(argv, env=env, cwd="/", capture_output=True, timeout=60, check=False)
    assert marker.exists() is not isolated
