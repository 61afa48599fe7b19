"""VMConfig -> libvirt domain XML, declared with ElementTree.

The XML is complete for a plain start; the runner changes only what depends
on the host at start time (the first serial port becomes its console socket).
"""

from __future__ import annotations

import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.settings import (
    Accel,
    Console,
    Disk,
    Firmware,
    NetworkKind,
    ShutdownMethod,
    VMConfig,
    detect_format,
    is_q35,
)

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
_DEV_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    element.text = text
    return element


def _letters(index: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa', as Linux names vda..vdz, vdaa."""
    out = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        out = chr(ord("a") + rest) + out
    return out


class _Targets:
    """Hand out target device names per prefix (sata and scsi share 'sd')."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}

    def next(self, bus: str) -> str:
        prefix = _DEV_PREFIX[bus]
        index = self.used.get(prefix, 0)
        self.used[prefix] = index + 1
        return prefix + _letters(index)


def _is_block(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def _disk(devices: ET.Element, disk: Disk, targets: _Targets) -> None:
    block = _is_block(disk.path)
    element = _sub(devices, "disk", type="block" if block else "file", device="disk")
    driver = {"name": "qemu", "type": detect_format(disk)}
    if disk.cache not in (None, "default"):
        driver["cache"] = disk.cache
    _sub(element, "driver", **driver)
    _sub(element, "source", **{"dev" if block else "file": str(disk.path)})
    _sub(element, "target", dev=targets.next(disk.bus), bus=disk.bus)
    if disk.readonly:
        _sub(element, "readonly")


def _cdrom(devices: ET.Element, path: Path, bus: str, targets: _Targets) -> None:
    element = _sub(devices, "disk", type="file", device="cdrom")
    _sub(element, "driver", name="qemu", type="raw")
    _sub(element, "source", file=str(path))
    _sub(element, "target", dev=targets.next(bus), bus=bus)
    _sub(element, "readonly")


def _cpu(domain: ET.Element, vm: VMConfig, accel: str) -> None:
    model = vm.cpu_model
    if model is None:
        model = "host-passthrough" if accel == "kvm" else None
    if model is None:
        return
    if model in ("host-passthrough", "host-model"):
        if accel != "kvm":
            raise ConfigError(f"CPUModel={model} needs KVM, and the VM runs under TCG",
                              path=vm.source_path, key="CPUModel")
        _sub(domain, "cpu", mode=model)
    elif model == "max":
        _sub(domain, "cpu", mode="maximum")
    else:
        cpu = _sub(domain, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", model, fallback="forbid")


def read_domain_xml(vm: VMConfig) -> str:
    """The text of VM's DomainXML= file, checked to be a libvirt <domain>."""
    assert vm.domain_xml is not None
    try:
        text = vm.domain_xml.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid UTF-8"
        raise ConfigError(f"cannot read domain XML: {reason}", path=vm.domain_xml) from None
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ConfigError(f"invalid XML: {e}", path=vm.domain_xml) from None
    if root.tag != "domain":
        raise ConfigError(f"the root element is <{root.tag}>, not <domain>", path=vm.domain_xml)
    return text


def host_files(root: ET.Element) -> list[tuple[str, str, bool]]:
    """(element, path, writable) of each host file a domain names that must exist when
    it starts: disk and CD-ROM images or devices, kernel, initrd, device tree, firmware.
    The NVRAM file is not among them: libvirt makes it from a template."""
    files = []
    for disk in root.iterfind("./devices/disk"):
        src = disk.find("source")
        where = None if src is None else (src.get("file") or src.get("dev"))
        if where:
            writable = disk.find("readonly") is None and disk.get("device") != "cdrom"
            files.append(("disk", where, writable))
    for tag in ("kernel", "initrd", "dtb", "loader"):
        element = root.find(f"./os/{tag}")
        if element is not None and element.text and element.text.strip():
            files.append((tag, element.text.strip(), False))
    return files


def render(vm: VMConfig, accel: Literal["kvm", "tcg"], *, nvram_dir: Path | None = None) -> str:
    """The libvirt domain XML of VM running under ACCEL.

    A UEFI VM keeps its variables in NVRAM_DIR/NAME_VARS.fd (libvirt copies the
    firmware's template there on first start); without NVRAM_DIR libvirt picks a
    path inside its root, which does not outlive the runtime directory.
    For a DomainXML= VM this is that file's text, unchanged.
    """
    if accel not in ("kvm", "tcg"):
        raise QemuUnitError(f"cannot render for accelerator {accel!r}: the runner picks kvm or tcg")
    if vm.accel is not Accel.AUTO and vm.accel != accel:
        raise QemuUnitError(f"the VM says Accel={vm.accel}, cannot render it for {accel}")
    if vm.domain_xml is not None:
        return read_domain_xml(vm)

    domain = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    _sub(domain, "name", vm.name)
    _sub(domain, "uuid", vm.domain_uuid())
    # libvirt counts in KiB; round up so that the guest gets at least Memory=.
    _sub(domain, "memory", str(-(-vm.memory // 1024)), unit="KiB")
    _sub(domain, "vcpu", str(vm.cpus))

    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=vm.machine)
    if vm.firmware is Firmware.UEFI:
        os_.set("firmware", "efi")
        # Secure Boot firmware needs SMM and enrolled keys; this picks plain OVMF.
        firmware = _sub(os_, "firmware")
        _sub(firmware, "feature", enabled="no", name="secure-boot")
        if nvram_dir is not None:
            _sub(os_, "nvram", str(nvram_dir / f"{vm.name}_VARS.fd"))
    if vm.kernel is not None:
        _sub(os_, "kernel", str(vm.kernel))
        if vm.initrd is not None:
            _sub(os_, "initrd", str(vm.initrd))
        if vm.kernel_cmdline:
            _sub(os_, "cmdline", vm.kernel_cmdline)
    else:
        _sub(os_, "boot", dev="hd")
        if vm.cdroms:
            _sub(os_, "boot", dev="cdrom")

    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _cpu(domain, vm, accel)
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    targets = _Targets()
    for disk in vm.disks:
        _disk(devices, disk, targets)
    cdrom_bus = "sata" if is_q35(vm.machine) else "ide"
    for cdrom in vm.cdroms:
        _cdrom(devices, cdrom, cdrom_bus, targets)
    if any(d.bus == "scsi" for d in vm.disks):
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")

    for network, mac in zip(vm.networks, vm.macs(), strict=True):
        kind = {
            NetworkKind.USER: "user",
            NetworkKind.TAP: "ethernet",
            NetworkKind.BRIDGE: "bridge",
        }[network.kind]
        interface = _sub(devices, "interface", type=kind)
        _sub(interface, "mac", address=mac)
        if network.kind is NetworkKind.TAP:
            assert network.target is not None
            _sub(interface, "target", dev=network.target, managed="no")
        elif network.kind is NetworkKind.BRIDGE:
            assert network.target is not None
            _sub(interface, "source", bridge=network.target)
        _sub(interface, "model", type="virtio")

    if vm.console is Console.JOURNAL:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")
    if ShutdownMethod.AGENT in vm.shutdown_mode:
        # No <source>: libvirt makes the socket path (the runner may set a shorter one).
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    # Guests starve for entropy under TCG without it; /dev/urandom never blocks.
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")

    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"
