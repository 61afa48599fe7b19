"""From a VM's configuration to the domain XML the runner starts; `render` and `validate`.

No libvirt here: `qemu-unit render`/`validate` and the runner share this path.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from qemu_unit import domain, settings, source
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.log import log as logger
from qemu_unit.names import check_name


def kvm_problem() -> str | None:
    """Why /dev/kvm cannot be used by this process, or None when it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def finalize_accel(vm: settings.VMConfig) -> Literal["kvm", "tcg"]:
    """Accel= resolved on this host: auto is KVM where /dev/kvm opens, else TCG."""
    wanted = vm.accel.value
    if wanted == "tcg":
        return "tcg"
    problem = kvm_problem()
    if problem is None:
        return "kvm"
    if wanted == "kvm":
        raise ConfigError(f"KVM requested but unusable ({problem})", **_origin(vm, "Accel"))
    if vm.domain_xml is None:  # a full XML file names its own domain type
        logger.warning("KVM is unusable (%s); falling back to TCG, which is much slower", problem)
    return "tcg"


def _origin(vm: settings.VMConfig, key: str) -> dict[str, Any]:
    entry = vm.origin(key)
    if entry is None:
        return {"path": vm.source_path, "key": key}
    return {"path": entry.path, "line": entry.line, "key": key}


def adapt_xml(
    xml: str,
    *,
    name: str,
    path: str,
    console: Path | None,
    agent: Path,
    kvm: str | None,
) -> tuple[str, str]:
    """Make a domain ours: our name, our console socket; refuse KVM when unusable.

    Returns the XML and the domain type. `kvm` is None when KVM is usable, else why not.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ConfigError(f"malformed domain XML: {e}", path=path, line=e.position[0]) from None
    if root.tag != "domain":
        raise ConfigError(f"root element is <{root.tag}>, expected <domain>", path=path)
    virt = root.get("type", "")
    if virt == "kvm" and kvm is not None:
        raise ConfigError(f"<domain type='kvm'> but KVM is unusable ({kvm})", path=path)
    check_xml_files(root, path)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for chan in devices.findall("channel"):
        target = chan.find("target")
        if target is not None and target.get("name") == "org.qemu.guest_agent.0":
            chan.set("type", "unix")
            for old in chan.findall("source"):
                chan.remove(old)
            chan.insert(0, ET.Element("source", mode="bind", path=os.fspath(agent)))
    if console is not None:
        _take_console(devices, console)
    return ET.tostring(root, encoding="unicode"), virt


def check_xml_files(root: ET.Element, path: str) -> None:
    """Files the domain names must exist: a clear error here beats QEMU's exit later."""
    for tag, name, _writable in domain.host_files(root):
        if not os.access(name, os.R_OK):
            what = "missing" if not os.path.exists(name) else "not readable"
            raise ConfigError(f"<{tag}> names {name}, which is {what}", path=path)


def _take_console(devices: ET.Element, path: Path) -> None:
    """Point serial port 0 at our socket; libvirt mirrors it as the console again."""
    for cons in devices.findall("console"):
        target = cons.find("target")
        if target is None or target.get("type", "serial") == "serial":
            devices.remove(cons)
    serial = devices.find("serial")
    if serial is None:
        serial = ET.SubElement(devices, "serial")
        ET.SubElement(serial, "target", port="0")
    serial.attrib.clear()
    serial.set("type", "unix")
    for child in list(serial):
        if child.tag != "target":
            serial.remove(child)
    serial.insert(0, ET.Element("source", mode="connect", path=os.fspath(path)))


def load_vm(name: str, search_path: Sequence[Path] | None = None) -> settings.VMConfig:
    src = source.find_source(check_name(name), search_path)
    return settings.load_vm(src)


def render_name(name: str, search_path: Sequence[Path] | None = None) -> str:
    vm = load_vm(name, search_path)
    xml = domain.render(vm, finalize_accel(vm), nvram_dir=Path("/var/lib/qemu-run") / vm.name)
    return xml if xml.endswith("\n") else xml + "\n"


def _load_target(target: str, search_path: Sequence[Path] | None) -> settings.VMConfig:
    """TARGET is a file when it names one (a path, or NAME.vm/NAME.xml that exists here)."""
    path = Path(target)
    is_file = "/" in target or (path.suffix in (".vm", ".xml") and path.exists())
    if not is_file:
        return load_vm(target, search_path)
    if not path.exists():
        raise ConfigError("no such file", path=path)
    kind: Literal["vm", "xml"] = "xml" if path.suffix == ".xml" else "vm"
    name = path.name.rsplit(".", 1)[0]
    dropins = source.find_dropins([name], (path.parent,)) if kind == "vm" else ()
    return settings.load_vm(source.Source(name=name, kind=kind, path=path, dropins=dropins))


def validate(targets: Sequence[str], search_path: Sequence[Path] | None = None) -> list[str]:
    """Check each target; one message per invalid one. No target: everything visible.

    Nothing here depends on this host's KVM: a file is checked as its Accel= says.
    """
    problems: list[str] = []
    vms: list[Any] = []
    if not targets:
        errors: list[ConfigError] = []
        vms = list(source.list_sources(search_path, errors=errors))
        problems += [str(e) for e in errors]
    for target in (*targets, *vms):
        try:
            if isinstance(target, source.Source):
                vm = settings.load_vm(target)
            else:
                vm = _load_target(target, search_path)
            settings.check_files(vm)
            if vm.domain_xml is not None:
                accel: Literal["kvm", "tcg"] = "kvm" if vm.accel.value == "kvm" else "tcg"
                # domain.render has parsed it; the files it names must exist too.
                xml = domain.render(vm, accel)
                check_xml_files(ET.fromstring(xml), os.fspath(vm.domain_xml))
        except QemuUnitError as e:
            problems.append(str(e))
    return problems
