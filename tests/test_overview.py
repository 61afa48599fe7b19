"""`qemu-unit list` / `status`: records from config + systemd properties + status file."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from qemu_unit import paths
from qemu_unit.cli import commands as cli
from qemu_unit.cli import overview
from qemu_unit.config import domainxml
from qemu_unit.vm import status
from tests.support.schema import validate

SHOW = """\
Id=qemu-run@web.service
LoadState=loaded
ActiveState=active
SubState=running
Result=success
MainPID=4242
StatusText=Running (TCG)
WantedBy=multi-user.target
RequiredBy=
ExecMainStatus=0
ActiveEnterTimestamp=@1764550800
ActiveExitTimestamp=
InactiveEnterTimestamp=
InactiveExitTimestamp=@1764550790

Id=qemu-run@off.service
LoadState=loaded
ActiveState=failed
SubState=failed
Result=exit-code
MainPID=0
StatusText=Failed: /etc/qemu-run/off.vm:3: Kernel=: /x does not exist
WantedBy=
RequiredBy=
ExecMainStatus=78
ActiveEnterTimestamp=
ActiveExitTimestamp=
InactiveEnterTimestamp=@1764550900
InactiveExitTimestamp=
"""

VM = """\
[VM]
Memory=1G
CPUs=2
Accel=tcg
Kernel=/nonexistent/vmlinuz
"""


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "web.vm").write_text(VM)
    (etc / "off.vm").write_text(VM.replace("CPUs=2", "CPUs=1"))
    (etc / "bad.vm").write_text("[VM]\nMemroy=1G\n")
    (etc / "gone.vm").symlink_to(os.devnull)
    (etc / "x.xml").write_text("<domain type='qemu'><memory unit='MiB'>300</memory>"
                               "<vcpu>3</vcpu></domain>")
    (etc / "y.xml").write_text("<domain>\n<memory>")
    run = tmp_path / "run" / "web"
    run.mkdir(parents=True)
    status.write(run, status.Status(
        name="web", pid=4242, qemu_pid=4300, uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        accelerator="tcg", memory=1024**3, cpus=2,
        ports=(status.Port("127.0.0.1", 2222, 22, "tcp"),), started=1764550800))
    # A status file left by an earlier runner of a VM that is not running.
    (tmp_path / "run" / "off").mkdir()
    status.write(tmp_path / "run" / "off", status.Status(name="off", pid=77, accelerator="kvm"))

    def show(units: list[str], user: bool = False) -> dict[str, dict[str, str]]:
        props = {b["Id"]: b for b in overview.parse_show(SHOW)}
        out = {}
        for unit in units:
            out[unit] = props.get(unit) or {"Id": unit, "LoadState": "loaded",
                                            "ActiveState": "inactive", "SubState": "dead",
                                            "MainPID": "0", "WantedBy": ""}  # fmt: skip
        return out

    monkeypatch.setattr(overview, "unit_properties", show)
    return tmp_path


def collect(tree: Path) -> dict[str, overview.VMState]:
    vms, problem = overview.collect(search_path=[tree / "etc"], roots=tree / "run",
                                    states=tree / "state")
    assert problem is None
    return {vm.name: vm for vm in vms}


def test_parse_show_keeps_units_apart_and_values_whole() -> None:
    blocks = overview.parse_show(SHOW)
    assert [b["Id"] for b in blocks] == ["qemu-run@web.service", "qemu-run@off.service"]
    assert blocks[1]["StatusText"] == "Failed: /etc/qemu-run/off.vm:3: Kernel=: /x does not exist"


def test_collect_merges_config_systemd_and_status_file(tree: Path) -> None:
    vms = collect(tree)
    assert list(vms) == ["bad", "gone", "off", "web", "x", "y"]
    web = vms["web"]
    assert (web.active_state, web.sub_state, web.main_pid) == ("active", "running", 4242)
    assert web.since == "2025-12-01T01:00:00Z"
    assert web.enabled is True and web.wanted_by == ["multi-user.target"]
    assert (web.accelerator, web.accelerator_setting, web.qemu_pid) == ("tcg", "tcg", 4300)
    assert (web.memory, web.cpus) == (1024**3, 2)
    assert web.ports[0]["host_port"] == 2222

    off = vms["off"]
    assert (off.active_state, off.exit_status, off.main_pid) == ("failed", 78, None)
    assert off.since == "2025-12-01T01:01:40Z"
    # The stale status file of an earlier runner is not believed.
    assert off.accelerator is None and off.accelerator_setting == "tcg"
    assert off.enabled is False

    assert vms["gone"].masked and "masked" in (vms["gone"].error or "")
    assert vms["bad"].error and "bad.vm:2: Memroy=" in vms["bad"].error
    assert (vms["x"].memory, vms["x"].cpus, vms["x"].accelerator_setting) == (300 * 1024**2, 3,
                                                                             None)
    assert vms["y"].error and "y.xml:2: invalid XML" in vms["y"].error


def test_status_file_of_another_runner_is_ignored(tree: Path) -> None:
    status.write(tree / "run" / "web", status.Status(name="web", pid=1, accelerator="kvm"))
    assert collect(tree)["web"].accelerator is None


def test_json_matches_the_documented_schema(tree: Path) -> None:
    vms = list(collect(tree).values())
    doc = json.loads(overview.list_json(vms))
    validate(doc, "list")
    assert doc["version"] == 1
    validate(json.loads(overview.status_json(vms[0], ["a", "b"])), "status")


def test_saved_state_is_shown_with_size_and_age(tree: Path) -> None:
    saved_dir = tree / "state" / "off" / "saved"
    saved_dir.mkdir(parents=True)
    (saved_dir / "meta.json").write_text(json.dumps(
        {"version": 1, "size": 300 * 1024**2, "created": 1764550800, "sha256": "0" * 64,
         "xml_sha256": "1" * 64, "base": None}))
    vms = collect(tree)
    assert vms["off"].saved_state == {"size": 300 * 1024**2, "created": "2025-12-01T01:00:00Z"}
    assert vms["web"].saved_state is None
    text = overview.status_text(vms["off"], [])
    line = next(x for x in text.splitlines() if "Saved state:" in x)
    assert "300 MiB, saved " in line and " d " in line
    assert line.endswith("ago); the next start restores it")
    validate(json.loads(overview.status_json(vms["off"], [])), "status")


def test_schema_names_every_field() -> None:
    """A field added to VMState without documenting it fails here."""
    from tests.support.schema import schema

    vm = schema()["$defs"]["vm"]
    fields = list(overview.VMState.__dataclass_fields__)
    assert sorted(vm["properties"]) == sorted(fields)
    assert sorted(vm["required"]) == sorted(fields)


def test_list_text_is_a_table(tree: Path) -> None:
    text = overview.list_text(list(collect(tree).values()))
    lines = text.splitlines()
    header = lines[0]
    assert header.split() == list(overview.COLUMNS)
    rows = {line.split()[0]: line for line in lines[1:6 + 1]}
    web = rows["web"]
    assert web.split()[:9] == ["web", "yes", "active/running", "4242", *web.split()[4:6],
                               "tcg", "1G", "2"]  # fmt: skip
    assert "127.0.0.1:2222->22/tcp" in web
    # Columns line up: every row's STATE starts where the header's does.
    col = header.index("STATE")
    assert all(line[col - 1] == " " and line[col] != " " for line in rows.values())
    assert rows["gone"].split()[2] == "masked"
    assert "error: " in rows["bad"] and "Memroy" in rows["bad"]
    assert lines[-1] == "6 VMs listed."


def test_status_text(tree: Path) -> None:
    vm = collect(tree)["web"]
    text = overview.status_text(vm, ["qemu-unit-guest: booted"])
    assert "State: active (running) since " in text
    assert "Main PID: 4242 (QEMU 4300)" in text
    assert "Accelerator: tcg (Accel=tcg)" in text
    assert text.rstrip().endswith("  qemu-unit-guest: booted")
    off = overview.status_text(collect(tree)["off"], [])
    assert "State: failed (failed) since" in off and "exit status 78" in off
    assert "Console: no lines" in off


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "-"), (512 * 1024**2, "512M"), (2 * 1024**3, "2G"), (1536 * 1024**2, "1536M"),
     (1000, "1000B"), (4096, "4K")],
)  # fmt: skip
def test_format_size(size: int | None, text: str) -> None:
    assert overview.format_size(size) == text


def test_unit_properties_without_systemd_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    problem = overview.unit_properties(["qemu-run@x.service"])
    assert isinstance(problem, str) and "systemctl" in problem


def test_status_of_unknown_vm_is_a_config_error(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["status", "nosuch", "--config-dir", str(tmp_path)]) == 78
    assert "no nosuch.vm or nosuch.xml" in capsys.readouterr().err


def test_status_file_roundtrip_and_refusals(tmp_path: Path) -> None:
    record = status.Status(name="a", pid=3, ports=(status.Port("::1", 80, 8, "udp"),))
    status.write(tmp_path, record)
    assert status.read(tmp_path) == record
    # The file format: the JSON other tools may read (docs/qemu-unit.schema.json is `list`'s).
    assert json.loads((tmp_path / status.FILENAME).read_text()) == {
        "version": 1, "name": "a", "pid": 3, "qemu_pid": None, "uuid": None,
        "accelerator": None, "memory": None, "cpus": None, "started": None, "health": None,
        "ports": [{"host_ip": "::1", "host_port": 80, "guest_port": 8, "protocol": "udp"}]}
    # HealthCmd=: the check's state; a malformed one from the file is dropped.
    checked = status.Status(name="a", health=status.Health("unhealthy", 3, "inactive", 3, 5.0, 9))
    status.write(tmp_path, checked)
    assert status.read(tmp_path) == checked
    (tmp_path / status.FILENAME).write_text('{"version": 1, "health": {"status": "fine"}}')
    assert status.read(tmp_path) == status.Status()
    # Written by an unprivileged runner: a field of the wrong type is dropped, not trusted.
    (tmp_path / status.FILENAME).write_text(
        '{"version": 1, "pid": "3", "uuid": 7, "cpus": true, "ports": [{"host_ip": 1}, 5]}')
    assert status.read(tmp_path) == status.Status()
    (tmp_path / status.FILENAME).write_text("[" * 50000 + "]" * 50000)
    assert status.read(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == [status.FILENAME]  # no temporary left
    (tmp_path / status.FILENAME).unlink()
    (tmp_path / status.FILENAME).symlink_to("/etc/passwd")
    assert status.read(tmp_path) is None
    (tmp_path / status.FILENAME).unlink()
    os.mkfifo(tmp_path / status.FILENAME)
    assert status.read(tmp_path) is None  # and does not block
    (tmp_path / status.FILENAME).unlink()
    (tmp_path / status.FILENAME).write_text('{"version": 99}')
    assert status.read(tmp_path) is None


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("<domain><memory>524288</memory><vcpu>2</vcpu></domain>", (512 * 1024**2, 2)),
        ("<domain><memory unit='GiB'>1</memory></domain>", (1024**3, None)),
        ("<domain><memory unit='MB'>1</memory><vcpu placement='static'>4</vcpu></domain>",
         (1000**2, 4)),
        ("<domain/>", (None, None)),
    ],
)
def test_resources(xml: str, expected: tuple[int | None, int | None]) -> None:
    assert domainxml.resources(ET.fromstring(xml)) == expected


def test_status_file_nested_40000_deep_is_ignored_not_a_traceback(tree: Path) -> None:
    # Written by the VM's user; json recurses once per level (the review: a RecursionError
    # in register-machine, list and status).
    path = tree / "run" / "web" / paths.STATUS_FILE
    path.write_text("[" * 40_000 + "]" * 40_000)
    assert status.read(tree / "run" / "web") is None
    web = collect(tree)["web"]
    assert web.uuid is None and web.active_state == "active"
    assert "web" in overview.status_text(web, [])
    from qemu_unit.vm import machine

    assert machine.read_uuid(tree / "run" / "web") is None


def test_guest_bytes_are_escaped_in_status_and_list(tree: Path) -> None:
    # The review: a guest's console line set the admin's window title through `status`.
    title = "\x1b]0;pwned\x07"
    vm = collect(tree)["web"]
    vm.status_text = f"Running {title}\r\u202e"
    vm.ports = [{"host_ip": "\x1b[2J", "host_port": 1, "guest_port": 2}]
    text = overview.status_text(vm, [f"login: {title}", "\x9b31m red"])
    listing = overview.list_text([vm])
    for out in (text, listing):
        assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0 for c in out)
        assert "\u202e" not in out
        assert "\\x1b]0;pwned\\x07" in out and "\\x1b[2J" in out
    assert "  login: \\x1b]0;pwned\\x07" in text and "\\u009b31m red" in text
    # JSON escapes control characters by itself.
    assert "\x1b" not in overview.status_json(vm, [title])


def test_unit_properties_shows_only_what_systemd_has_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes for any number of VMs: the loaded units (one D-Bus call), then
    `systemctl show` of those only (it would load every unit it is given)."""
    calls = tmp_path / "calls"
    listing = {"type": "a(ssssssouso)", "data": [[
        ["qemu-run@web.service", "VM web", "loaded", "active", "running", "",
         "/org/freedesktop/systemd1/unit/x", 0, "", "/"]]]}
    (tmp_path / "busctl").write_text(
        f"#!/bin/sh\necho busctl \"$@\" >> {calls}\necho '{json.dumps(listing)}'\n")
    (tmp_path / "systemctl").write_text(
        f"#!/bin/sh\necho systemctl \"$@\" >> {calls}\n"
        "printf 'Id=qemu-run@web.service\\nActiveState=active\\nMainPID=42\\n'\n")
    for tool in ("busctl", "systemctl"):
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    units = [f"qemu-run@{n}.service" for n in ("web", "idle", "other")]
    props = overview.unit_properties(units)
    assert isinstance(props, dict)
    assert props["qemu-run@web.service"]["MainPID"] == "42"
    assert props["qemu-run@idle.service"] == {"Id": "qemu-run@idle.service",
                                              **overview.NOT_LOADED}
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and "ListUnitsByPatterns" in lines[0]
    assert lines[1].endswith("-- qemu-run@web.service")
