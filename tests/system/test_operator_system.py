"""`qemu-unit list` / `status` and machined registration under a real systemd (nspawn)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.container import Container
from tests.support.schema import validate
from tests.support.security import exposure
from tests.support.vm import (
    console,
    install_qemu_unit,
    invocation,
    prop,
    put_file,
    qemu_pids,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

VMS = ("run", "idle", "dead", "masked", "broken")


def prepare(upper: Path) -> None:
    stage_guest(upper)
    write_vm(upper, "run", vm_text("wait", vm="CPUs=2", install="WantedBy=multi-user.target"))
    write_vm(upper, "idle", vm_text("wait"))
    write_vm(upper, "dead", vm_text("wait").replace("/vmlinuz", "/no-such-kernel"))
    write_vm(upper, "broken", vm_text("wait", vm="Memroy=1G"))
    masked = upper / "etc/qemu-run/masked.vm"
    masked.symlink_to("/dev/null")
    # An opaque directory hides the host's own VMs (the demo VM): only ours are listed.
    os.setxattr(masked.parent, "trusted.overlay.opaque", b"y")


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("operator", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        # WantedBy= started it at boot, with the host's unit: restart it with ours.
        ct.systemctl("restart", "qemu-run@run")
        ct.systemctl("start", "qemu-run@dead", check=False)
        wait_for("guest boot", lambda: "qemu-unit-guest: booted" in console(ct, "run"))
        yield ct
        # The guest may still be booting (after the restart test) on a loaded machine:
        # the runner presses the power button until it listens.
        ct.systemctl("stop", "qemu-run@run", check=False, timeout=180)


def qemu_unit(ct: Container, qemu_unit_bin: Path, *args: str, check: bool = True) -> Any:
    return ct.run(str(qemu_unit_bin), *args, check=check)


def list_json(ct: Container, qemu_unit_bin: Path) -> dict[str, dict[str, Any]]:
    out = qemu_unit(ct, qemu_unit_bin, "list", "--json").stdout
    doc = json.loads(out)
    validate(doc, "list")
    return {vm["name"]: vm for vm in doc["vms"]}


def test_list_json_shows_every_state(ct: Container, qemu_unit_bin: Path) -> None:
    vms = list_json(ct, qemu_unit_bin)
    assert sorted(vms) == sorted(VMS)

    run = vms["run"]
    assert (run["active_state"], run["sub_state"]) == ("active", "running")
    assert run["main_pid"] == int(prop(ct, "qemu-run@run.service", "MainPID"))
    assert run["qemu_pid"] in qemu_pids(ct, "run")
    assert run["accelerator"] == "tcg" and run["accelerator_setting"] == "tcg"
    assert (run["memory"], run["cpus"]) == (256 * 1024**2, 2)
    assert run["enabled"] is True and "multi-user.target" in run["wanted_by"]
    assert run["status_text"].startswith("Running")
    assert run["source"] == "/etc/qemu-run/run.vm"
    assert run["since"] and run["since"].endswith("Z")
    assert run["uuid"] and run["error"] is None
    assert run["ports"] == []

    idle = vms["idle"]
    assert (idle["active_state"], idle["main_pid"], idle["enabled"]) == ("inactive", None, False)
    assert idle["accelerator"] is None and idle["accelerator_setting"] == "tcg"

    dead = vms["dead"]
    assert (dead["active_state"], dead["result"], dead["exit_status"]) == (
        "failed", "exit-code", 78)
    assert "no-such-kernel" in dead["status_text"]

    masked = vms["masked"]
    assert masked["masked"] is True and "masked" in masked["error"]

    broken = vms["broken"]
    assert "/etc/qemu-run/broken.vm:" in broken["error"] and "Memroy" in broken["error"]
    assert broken["memory"] is None


def test_list_text(ct: Container, qemu_unit_bin: Path) -> None:
    out = qemu_unit(ct, qemu_unit_bin, "list").stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ENABLED", "STATE", "PID"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    main = prop(ct, "qemu-run@run.service", "MainPID")
    assert rows["run"].split()[:4] == ["run", "yes", "active/running", main]
    assert " tcg " in rows["run"] and " 256M " in rows["run"]
    assert rows["idle"].split()[:3] == ["idle", "no", "inactive/dead"]
    assert rows["dead"].split()[:3] == ["dead", "no", "failed/failed"]
    assert rows["masked"].split()[:3] == ["masked", "no", "masked"]
    assert "error: /etc/qemu-run/broken.vm:" in rows["broken"]
    assert lines[-1] == "5 VMs listed."


def test_status_of_running_vm_has_console_lines(ct: Container, qemu_unit_bin: Path) -> None:
    doc = json.loads(qemu_unit(ct, qemu_unit_bin, "status", "run", "--json").stdout)
    validate(doc, "status")
    assert doc["vm"]["name"] == "run" and doc["vm"]["active_state"] == "active"
    assert any("qemu-unit-guest: booted" in line for line in doc["console"]), doc["console"]
    text = qemu_unit(ct, qemu_unit_bin, "status", "run").stdout
    assert "State: active (running) since" in text
    assert "qemu-unit-guest: booted" in text.split("Console")[1]


@pytest.mark.parametrize(
    ("name", "state", "expected"),
    [
        ("idle", "inactive", "Console: no lines"),
        ("dead", "failed", "no-such-kernel"),
        ("masked", "masked", "is masked"),
        ("broken", "inactive", "Memroy"),
    ],
)
def test_status_of_vm_that_does_not_run(
    ct: Container, qemu_unit_bin: Path, name: str, state: str, expected: str
) -> None:
    doc = json.loads(qemu_unit(ct, qemu_unit_bin, "status", name, "--json").stdout)
    validate(doc, "status")
    assert doc["vm"]["main_pid"] is None
    assert doc["vm"]["masked"] is (name == "masked")
    text = qemu_unit(ct, qemu_unit_bin, "status", name).stdout
    assert f"State: {state}" in text and expected in text, text


def test_status_of_unknown_vm_exits_78(ct: Container, qemu_unit_bin: Path) -> None:
    result = qemu_unit(ct, qemu_unit_bin, "status", "nosuch", check=False)
    assert result.returncode == 78
    assert "no nosuch.vm or nosuch.xml" in result.stderr


def machines(ct: Container) -> dict[str, dict[str, Any]]:
    out = ct.run("machinectl", "list", "--no-legend", "-o", "json").stdout
    return {m["machine"]: m for m in json.loads(out or "[]")}


def test_machinectl_sees_the_vm_and_powers_it_off(ct: Container, qemu_unit_bin: Path) -> None:
    unit = "qemu-run@run.service"
    # qemu-run-register@run registers it once the unit is active, not before it is. The
    # fixture restarted the VM just after boot: machined may still have the last runner for
    # a moment, until the register unit replaces it.
    main = prop(ct, unit, "MainPID")
    wait_for("registered", lambda: f"Leader={main}\n" in ct.run(
        "machinectl", "show", "run", check=False).stdout)
    found = machines(ct)
    assert found["run"]["class"] == "vm" and found["run"]["service"] == "qemu-unit", found
    show = ct.run("machinectl", "show", "run").stdout
    assert f"Leader={main}\n" in show and f"Unit={unit}\n" in show and "Class=vm\n" in show
    uuid = list_json(ct, qemu_unit_bin)["run"]["uuid"]
    assert f"Id={uuid.replace('-', '')}\n" in show
    status = ct.run("machinectl", "status", "run", "--no-pager").stdout
    assert f"Leader: {main}" in status and unit in status
    this = invocation(ct, "run")
    ct.run("machinectl", "poweroff", "run")
    wait_for("unit stopped", lambda: prop(ct, unit, "ActiveState") == "inactive", timeout=60)
    assert "Received SIGRTMIN+4" in runner_log(ct, "run", this)
    assert "qemu-unit-guest: power button pressed" in console(ct, "run", this)
    assert prop(ct, unit, "Result") == "success"
    wait_for("machine gone", lambda: "run" not in machines(ct))
    # Started again (a new leader), it is registered again.
    ct.systemctl("start", unit)
    main = prop(ct, unit, "MainPID")
    wait_for("registered again", lambda: f"Leader={main}\n" in ct.run(
        "machinectl", "show", "run", check=False).stdout)
    # A start with no registration left over: the unit's shell and busctl registered it
    # (Python's line has no quotes around the object path), with the UUID the runner wrote.
    assert f"Id={uuid.replace('-', '')}\n" in ct.run("machinectl", "show", "run").stdout
    # The shell echoes once busctl returned: journald may have it a moment after machined.
    wait_for("registration logged", lambda: (
        'Registered with systemd-machined as "/org/freedesktop/machine1/machine/run" '
        f"(leader {main})") in ct.journal("-u", unit, "-o", "cat").splitlines())
    # All of it as root with CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH alone (the uuid above
    # came through the runner's 0700 directory), under a sandbox without mounts.
    register = "qemu-run-register@run.service"
    assert prop(ct, register, "CapabilityBoundingSet") == "cap_dac_read_search cap_sys_admin"
    assert unit_exposure(ct, register) <= 3.9
    # A start of the running VM starts the register unit again: it keeps the registration.
    def ends() -> int:
        return ct.journal("-u", "systemd-machined", "-o", "cat").count("Machine run terminated")

    before = ends()
    ct.systemctl("start", unit)
    wait_for("kept", lambda: "Already registered with systemd-machined"
             in ct.journal("-u", unit, "-o", "cat").splitlines())
    assert f"Leader={main}\n" in ct.run("machinectl", "show", "run").stdout
    assert ends() == before


def test_restart_after_runner_kill_replaces_stale_registration(ct: Container) -> None:
    unit = "qemu-run@run.service"
    ct.systemctl("start", unit)
    main = prop(ct, unit, "MainPID")
    ct.run("kill", "-9", main)
    restarted: list[str] = []

    def running_again() -> bool:
        # Right after the kill systemd may still say "active" for the dead runner, then
        # MainPID=0: a new, non-zero MainPID that is still there once the unit is active.
        pid = prop(ct, unit, "MainPID")
        if pid in ("0", main) or prop(ct, unit, "ActiveState") != "active":
            return False
        restarted[:] = [pid]
        return prop(ct, unit, "MainPID") == pid

    wait_for("restart", running_again, timeout=60)
    new = restarted[0]
    wait_for("registration replaced", lambda: f"Leader={new}\n" in ct.run(
        "machinectl", "show", "run", check=False).stdout)


def unit_exposure(ct: Container, unit: str) -> float:
    """UNIT's `systemd-analyze security` exposure in the container (printed for the log)."""
    out = ct.run("systemd-analyze", "security", "--no-pager", unit).stdout
    print(out.splitlines()[-1])
    return exposure(out, unit)


def test_vm_without_network_still_scores_safe(ct: Container) -> None:
    assert unit_exposure(ct, "qemu-run@idle.service") <= 0.9


DBUS_POLICY = """<?xml version="1.0"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "https://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy user="qemu-run"><allow send_destination="org.freedesktop.machine1"
 send_interface="org.freedesktop.machine1.Manager" send_member="RegisterMachine"/></policy>
</busconfig>
"""


def test_systemd_252_refuses_registration_by_the_vm_user(ct: Container) -> None:
    """Why registration is a root step: neither D-Bus nor machined lets qemu-run register.

    Later machined versions check polkit (org.freedesktop.machine1.create-machine, then
    register-machine): on such a systemd this fails, and qemu-run-register@.service can go."""
    register = (
        "sleep 30 & exec dbus-send --system --print-reply --dest=org.freedesktop.machine1 "
        "/org/freedesktop/machine1 org.freedesktop.machine1.Manager.RegisterMachine "
        "string:probe array:byte:" + ",".join(["1"] * 16) + " string:x string:vm uint32:$! string:"
    )
    as_vm_user = ("setpriv", "--reuid=qemu-run", "--regid=qemu-run", "--init-groups",
                  "sh", "-c", register)  # fmt: skip
    refused = ct.run(*as_vm_user, check=False)
    assert refused.returncode != 0
    assert "AccessDenied: Rejected send message" in refused.stderr  # dbus-daemon's policy
    # With the D-Bus policy opened for qemu-run, machined itself refuses (its method needs
    # CAP_SYS_ADMIN; systemd 252 has no polkit action for registering).
    put_file(ct, "/etc/dbus-1/system.d/zz-test-qemu-run-machine1.conf", DBUS_POLICY)
    try:
        ct.systemctl("reload", "dbus")
        refused = ct.run(*as_vm_user, check=False)
        assert refused.returncode != 0
        assert "RegisterMachine() not permitted" in refused.stderr, refused.stderr
    finally:
        ct.run("rm", "/etc/dbus-1/system.d/zz-test-qemu-run-machine1.conf")
        ct.systemctl("reload", "dbus")
    assert "probe" not in machines(ct)
