"""`qemu-unit list` and `qemu-unit status NAME`: what VMs exist and what they are doing.

One record per VM, from three places, each asked once: the search path (source,
settings), systemd (the qemu-run@ units it has loaded, in one D-Bus call, then
`systemctl show` properties of those in one call, never its human output) and the
runner's status file (status.py). No libvirt: a VM's own runner holds its embed root,
nobody else may open it.

The JSON form is stable and described by docs/qemu-unit.schema.json; fields are
only ever added (and `version` raised when a meaning changes).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu_unit import command, paths
from qemu_unit.config import domainxml, settings, source
from qemu_unit.config.names import check_name
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.log import CONSOLE_IDENTIFIER
from qemu_unit.paths import SYSTEM_RUNTIME, SYSTEM_STATE, unit_name
from qemu_unit.vm import saved, status

JSON_VERSION = 1
CONSOLE_LINES = 10

# What `systemctl status` calls "since": the timestamp of entering the current state.
_SINCE = {
    "active": "ActiveEnterTimestamp",
    "reloading": "ActiveEnterTimestamp",
    "activating": "InactiveExitTimestamp",
    "deactivating": "ActiveExitTimestamp",
    "inactive": "InactiveEnterTimestamp",
    "failed": "InactiveEnterTimestamp",
}
PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "Result", "MainPID", "StatusText",
    "WantedBy", "RequiredBy", "ExecMainStatus", *sorted(set(_SINCE.values())),
)  # fmt: skip
# States in which a runner may be up and its status file current.
_UP = ("active", "activating", "deactivating", "reloading")


@dataclass
class VMState:
    """One VM as `list` and `status` show it; asdict() of it is the JSON record."""

    name: str
    unit: str
    source: str | None = None
    dropins: list[str] = field(default_factory=list)
    masked: bool = False
    error: str | None = None
    enabled: bool | None = None
    wanted_by: list[str] = field(default_factory=list)
    load_state: str | None = None
    active_state: str | None = None
    sub_state: str | None = None
    result: str | None = None
    exit_status: int | None = None
    main_pid: int | None = None
    since: str | None = None
    status_text: str | None = None
    accelerator: str | None = None
    accelerator_setting: str | None = None
    memory: int | None = None
    cpus: int | None = None
    ports: list[dict[str, Any]] = field(default_factory=list)
    uuid: str | None = None
    qemu_pid: int | None = None
    # HealthCmd=: status, failing_streak, last_output, ... (running VMs with a check only)
    health: dict[str, Any] | None = None
    # HostShutdown=save / qemu-unit save: {"size": bytes, "created": ISO UTC}, else None.
    saved_state: dict[str, Any] | None = None


# -- systemd ----------------------------------------------------------------------------------


def parse_show(text: str) -> list[dict[str, str]]:
    """`systemctl show` output for several units: one dict per unit, in order."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


# What systemd says of a unit it has not loaded (nothing started or wants it): asking
# would load it, and `systemctl show` loads each unit it is given (1.6 s for 200 VMs).
NOT_LOADED = {"ActiveState": "inactive", "SubState": "dead"}
SYSTEMD_MANAGER = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                   "org.freedesktop.systemd1.Manager")  # fmt: skip


def loaded_units(scope: Sequence[str]) -> set[str]:
    """Every qemu-run@ unit systemd has in memory, in one D-Bus call (ListUnitsByPatterns,
    as `systemctl list-units` makes); CommandError when systemd cannot be asked."""
    out = command.run(["busctl", *scope, "--json=short", "call", *SYSTEMD_MANAGER,
                       "ListUnitsByPatterns", "asas", "0", "1",
                       f"{paths.UNIT_PREFIX}*{paths.UNIT_SUFFIX}"], "busctl call")
    try:
        return {str(row[0]) for row in json.loads(out)["data"][0]}
    except (ValueError, KeyError, IndexError, TypeError):
        raise command.CommandError("busctl call: unexpected answer", out[-200:]) from None


def unit_properties(
    units: Sequence[str], user: bool = False
) -> dict[str, dict[str, str]] | str:
    """PROPERTIES of each of UNITS by unit name (USER: of the caller's user manager), or
    why systemd could not be asked. Two calls whatever the number of units: the loaded
    ones, then `systemctl show` of those (one unit alone: show only)."""
    if not units:
        return {}
    scope = ["--user"] if user else []
    try:
        loaded = loaded_units(scope) if len(units) > 1 else set(units)
        shown = [u for u in units if u in loaded]
        out = command.run(["systemctl", *scope, "show", "--timestamp=unix",
                           "-p", ",".join(PROPERTIES), "--", *shown],
                          "systemctl show") if shown else ""
    except command.CommandError as e:
        return e.detail.splitlines()[-1] if e.detail else str(e)
    props = {u: {"Id": u, **NOT_LOADED} for u in units}
    props.update((block.get("Id", ""), block) for block in parse_show(out))
    return props


def _unix_time(value: str) -> str | None:
    """'@1764550000' (systemctl --timestamp=unix) -> ISO 8601 UTC; None when unset."""
    if not value.startswith("@") or not value[1:].isdigit() or value == "@0":
        return None
    when = datetime.datetime.fromtimestamp(int(value[1:]), datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _int(value: str | None) -> int | None:
    return int(value) if value and value.lstrip("-").isdigit() else None


def apply_unit(vm: VMState, props: dict[str, str]) -> None:
    vm.load_state = props.get("LoadState") or None
    vm.active_state = props.get("ActiveState") or None
    vm.sub_state = props.get("SubState") or None
    vm.result = props.get("Result") or None
    vm.exit_status = _int(props.get("ExecMainStatus"))
    vm.main_pid = _int(props.get("MainPID")) or None
    vm.status_text = props.get("StatusText") or None
    vm.wanted_by = sorted(
        {*props.get("WantedBy", "").split(), *props.get("RequiredBy", "").split()}
    )
    vm.enabled = any(t.endswith(".target") for t in vm.wanted_by)
    since = _SINCE.get(vm.active_state or "")
    vm.since = _unix_time(props.get(since, "")) if since else None


# -- configuration and runner -----------------------------------------------------------------


def apply_config(vm: VMState, src: source.Source) -> None:
    vm.source = os.fspath(src.path)
    vm.dropins = [os.fspath(p) for p in src.dropins]
    try:
        config = settings.load_vm(src)
    except QemuUnitError as e:
        vm.error = str(e)
        return
    except OSError as e:
        vm.error = f"{e.filename or src.path}: {e.strerror}"
        return
    if config.domain_xml is not None:
        # A full domain XML says its own size; Accel= and Memory= do not apply.
        try:
            vm.memory, vm.cpus = domainxml.resources(domainxml.read_domain_xml(config.domain_xml))
        except ConfigError as e:
            vm.error = str(e)
        return
    vm.memory, vm.cpus = config.memory, config.cpus
    vm.accelerator_setting = config.accel.value


def apply_runtime(vm: VMState, root: Path) -> None:
    """The runner's status file, when it belongs to the runner systemd knows as MainPID."""
    if vm.active_state not in _UP:
        return
    record = status.read(root)
    if record is None or record.pid != vm.main_pid:
        return  # not written yet, or left by an earlier runner
    vm.accelerator, vm.uuid, vm.qemu_pid = record.accelerator, record.uuid, record.qemu_pid
    vm.memory = record.memory if record.memory is not None else vm.memory
    vm.cpus = record.cpus if record.cpus is not None else vm.cpus
    vm.ports = [p._asdict() for p in record.ports]
    vm.health = record.health._asdict() if record.health is not None else None


def apply_saved(vm: VMState, state: Path) -> None:
    """A saved state in the VM's state directory (readable by root and the VM's user)."""
    try:
        found = saved.read(state)
    except (QemuUnitError, OSError):
        return
    if found is not None:
        created = datetime.datetime.fromtimestamp(found.created, datetime.UTC)
        vm.saved_state = {"size": found.size, "created": created.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _state(name: str, find: Any) -> VMState:
    vm = VMState(name=name, unit=unit_name(name))
    try:
        src = find(name)
    except source.MaskedError as e:
        vm.masked = True
        vm.error = str(e)
        vm.source = os.fspath(e.path) if e.path else None
        return vm
    except ConfigError as e:
        vm.error = str(e)
        return vm
    if src is not None:
        apply_config(vm, src)
    return vm


def collect(
    names: Sequence[str] | None = None,
    search_path: Sequence[str | os.PathLike[str]] | None = None,
    roots: Path | None = None,  # where each VM's embed root is, by name
    user: bool = False,
    states: Path | None = None,  # where each VM's state directory is, by name
) -> tuple[list[VMState], str | None]:
    """The VMs NAMES (default: every VM on the search path) and, when systemd could
    not be asked, why not. USER: the caller's own VMs, under its user manager."""
    if roots is None:
        roots = _runtime_root(user)
    if states is None:
        states = paths.finalize_dirs("_").state.parent if user else SYSTEM_STATE
    if names is None:
        listing = source.Listing(search_path)
        vms = [_state(n, listing.find) for n in listing.names]
    else:
        vms = [_state(n, lambda n: source.find_source(n, search_path)) for n in names]
    props = unit_properties([vm.unit for vm in vms], user)
    problem = props if isinstance(props, str) else None
    for vm in vms:
        if not isinstance(props, str) and vm.unit in props:
            apply_unit(vm, props[vm.unit])
        apply_runtime(vm, roots / vm.name)
        apply_saved(vm, states / vm.name)
    return vms, problem


def _runtime_root(user: bool) -> Path:
    """Where the runners' embed roots are: the system's, or the caller's own runners'."""
    return paths.finalize_dirs("_").root.parent if user else SYSTEM_RUNTIME


def find_one(
    name: str,
    search_path: Sequence[str | os.PathLike[str]] | None = None,
    roots: Path | None = None,
    user: bool = False,
    states: Path | None = None,
) -> tuple[VMState, str | None]:
    """One VM, which must exist: on the search path (perhaps broken or masked) or as a
    loaded unit."""
    check_name(name)
    [vm], problem = collect([name], search_path, roots, user, states)
    known = vm.source is not None or vm.active_state not in (None, "inactive")
    if not known:
        raise ConfigError(vm.error or f"no VM {name!r}")
    return vm, problem


def console_lines(vm: VMState, count: int = CONSOLE_LINES, user: bool = False) -> list[str]:
    """The last COUNT lines the guest printed, from the journal (as far as we may read it)."""
    from systemd import journal

    reader = journal.Reader()
    try:
        reader.add_match(QEMU_UNIT_VM=vm.name)
        reader.add_match(SYSLOG_IDENTIFIER=CONSOLE_IDENTIFIER)
        # A trusted field: only the unit's own processes can log under it (a user
        # manager's units: _SYSTEMD_USER_UNIT, with the user's own uid).
        if user:
            reader.add_match(_SYSTEMD_USER_UNIT=vm.unit, _UID=str(os.getuid()))
        else:
            reader.add_match(_SYSTEMD_UNIT=vm.unit)
        reader.seek_tail()
        lines: list[str] = []
        while len(lines) < count:
            entry = reader.get_previous()
            if not entry:
                break
            message = entry.get("MESSAGE", "")
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
            lines.append(message)
    finally:
        reader.close()
    return lines[::-1]


# -- output -----------------------------------------------------------------------------------


def to_json(vm: VMState) -> dict[str, Any]:
    return asdict(vm)


def list_json(vms: Sequence[VMState]) -> str:
    return json.dumps({"version": JSON_VERSION, "vms": [to_json(vm) for vm in vms]}, indent=2)


def status_json(vm: VMState, console: Sequence[str]) -> str:
    data = {"version": JSON_VERSION, "vm": to_json(vm), "console": list(console)}
    return json.dumps(data, indent=2)


# What a terminal would act on: C0 and C1 controls, DEL, and the format characters that
# reorder or hide text (bidirectional overrides, zero-width characters).
_UNSAFE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_UNSAFE.update({c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x200B, 0x200C, 0x200D,
                                              0x200E, 0x200F, *range(0x202A, 0x202F),
                                              *range(0x2066, 0x206A), 0xFEFF)})
_UNSAFE[ord("\\")] = "\\\\"
_UNSAFE[ord("\t")] = "\\t"


def shown(text: str) -> str:
    """TEXT safe to print on a terminal: escape sequences, carriage returns and the like
    written as C escapes (\\x1b), as `journalctl` shows what a program logged. A guest's
    console lines, the runner's status and the status file's strings all go through it."""
    return text.translate(_UNSAFE)


def format_size(size: int | None) -> str:
    if size is None:
        return "-"
    for suffix, scale in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return f"{size}B"


def format_since(since: str | None) -> str:
    """ISO UTC -> local time, as systemctl shows it."""
    if since is None:
        return "-"
    when = datetime.datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC
    )
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def format_ports(ports: Sequence[dict[str, Any]]) -> str:
    """Podman's notation: 127.0.0.1:8080->80/tcp."""
    shown = []
    for p in ports:
        host = f"{p['host_ip']}:" if p.get("host_ip") else ""
        proto = p.get("protocol", "tcp")
        shown.append(f"{host}{p.get('host_port')}->{p.get('guest_port')}/{proto}")
    return ",".join(shown) or "-"


def format_state(vm: VMState) -> str:
    if vm.masked:
        return "masked"
    if vm.active_state is None:
        return "-"
    if vm.load_state not in (None, "loaded"):
        return vm.load_state
    return f"{vm.active_state}/{vm.sub_state}" if vm.sub_state else vm.active_state


def _accel(vm: VMState) -> str:
    return vm.accelerator or vm.accelerator_setting or "-"


def format_saved(state: dict[str, Any]) -> str:
    """'412 MiB, saved 2026-12-06 03:10:00 (2 h 5 min ago); ...'."""
    created = datetime.datetime.strptime(state["created"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC)
    age = max(0, int((datetime.datetime.now(datetime.UTC) - created).total_seconds()))
    ago = (f"{age // 86400} d {age % 86400 // 3600} h" if age >= 86400
           else f"{age // 3600} h {age % 3600 // 60} min" if age >= 3600
           else f"{age // 60} min {age % 60} s")
    return (f"{-(-state['size'] // 1024**2)} MiB, saved {format_since(state['created'])} "
            f"({ago} ago); the next start restores it")


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _status(vm: VMState) -> str:
    if vm.error and not vm.masked:
        return f"error: {vm.error}"
    return vm.status_text or ""


COLUMNS = ("NAME", "ENABLED", "STATE", "PID", "SINCE", "ACCEL", "MEMORY", "CPUS", "PORTS",
           "SOURCE", "STATUS")


def list_rows(vms: Sequence[VMState]) -> list[tuple[str, ...]]:
    return [
        (
            vm.name,
            _yes_no(vm.enabled),
            format_state(vm),
            str(vm.main_pid) if vm.main_pid else "-",
            format_since(vm.since),
            _accel(vm),
            format_size(vm.memory),
            str(vm.cpus) if vm.cpus is not None else "-",
            format_ports(vm.ports),
            vm.source or "-",
            _status(vm),
        )
        for vm in vms
    ]


def list_text(vms: Sequence[VMState]) -> str:
    """A table as `machinectl list` prints one; the last column is not padded."""
    rows = [COLUMNS, *(tuple(map(shown, row)) for row in list_rows(vms))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        " ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    ]
    lines.append(f"\n{len(vms)} VM{'s' if len(vms) != 1 else ''} listed.")
    return "\n".join(lines) + "\n"


def status_text(vm: VMState, console: Sequence[str]) -> str:
    state = format_state(vm)
    if vm.sub_state and not vm.masked and vm.load_state in (None, "loaded"):
        state = f"{vm.active_state} ({vm.sub_state})"
    if vm.since:
        state += f" since {format_since(vm.since)}"
    if vm.result not in (None, "success") and vm.active_state == "failed":
        state += f"; result {vm.result}, exit status {vm.exit_status}"
    source_text = vm.source or "-"
    if vm.dropins:
        source_text += " (drop-ins: " + ", ".join(vm.dropins) + ")"
    enabled = _yes_no(vm.enabled)
    if vm.wanted_by:
        enabled += f" ({', '.join(vm.wanted_by)})"
    pid = str(vm.main_pid) if vm.main_pid else "-"
    if vm.qemu_pid:
        pid += f" (QEMU {vm.qemu_pid})"
    accel = _accel(vm)
    if vm.accelerator and vm.accelerator_setting:
        accel += f" (Accel={vm.accelerator_setting})"
    fields = [
        ("Unit", vm.unit),
        ("Source", source_text),
        ("Enabled", enabled),
        ("State", state),
        ("Main PID", pid),
        ("UUID", vm.uuid or "-"),
        ("Accelerator", accel),
        ("Memory", format_size(vm.memory)),
        ("CPUs", str(vm.cpus) if vm.cpus is not None else "-"),
        ("Ports", format_ports(vm.ports)),
        ("Status", vm.status_text or "-"),
    ]
    if vm.health is not None:
        h = vm.health
        fields.append(("Health", f"{h.get('status')} (failing streak {h.get('failing_streak')}; "
                                 f"last output: {h.get('last_output') or '-'})"))
    if vm.saved_state:
        fields.append(("Saved state", format_saved(vm.saved_state)))
    if vm.error:
        fields.append(("Error", vm.error))
    width = max(len(k) for k, _ in fields)
    out = [f"{vm.name}"] + [f"{k.rjust(width)}: {shown(v)}" for k, v in fields]
    out += ["", f"Console (last {len(console)} lines):" if console else "Console: no lines"]
    out += [f"  {shown(line)}" for line in console]
    return "\n".join(out) + "\n"
