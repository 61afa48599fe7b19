"""The final libvirt domain of a VM: `build(vm, plan) -> Element`, declared with ElementTree.

The tree is complete: what the runner hands to createXML is `render(vm, plan)`,
serialised once, and `qemu-unit render` prints the same string. A .vm VM is
built from its keys; a DomainXML= VM's own domain is taken over (name, type,
console socket, agent socket, NVRAM). The host facts come from the plan
(host.py); nothing here looks at the host.
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from pathlib import Path

from qemu_unit import paths
from qemu_unit.config.settings import (
    HOST_CPU_MODELS,
    Accel,
    ConsoleMode,
    Disk,
    Firmware,
    NetworkKind,
    ReadyKind,
    Share,
    ShutdownMethod,
    VMConfig,
    is_q35,
)
from qemu_unit.errors import ConfigError
from qemu_unit.vm.host import DiskPlan, ImagePlan, Plan

# Keep the conventional prefix of libvirt's QEMU namespace (<qemu:commandline>).
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
# Where -device puts a network card libvirt does not know about: a slot of the root
# bus libvirt leaves free (it fills slots from 0x1 upwards).
EXTRA_NIC_SLOT = 0x10
FW_CFG_CREDENTIALS = "opt/io.systemd.credentials/"

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


def _disk(devices: ET.Element, disk: Disk, plan: DiskPlan, targets: _Targets) -> None:
    block = plan.block
    element = _sub(devices, "disk", type="block" if block else "file", device="disk")
    driver = {"name": "qemu", "type": plan.format}
    if disk.cache not in (None, "default"):
        driver["cache"] = disk.cache
    _sub(element, "driver", **driver)
    _sub(element, "source", **{"dev" if block else "file": str(disk.path)})
    _sub(element, "target", dev=targets.next(disk.bus), bus=disk.bus)
    if disk.readonly:
        _sub(element, "readonly")


def _image_disk(devices: ET.Element, image: ImagePlan, targets: _Targets) -> None:
    """The overlay, its backing store declared: libvirt and QEMU never probe the base."""
    element = _sub(devices, "disk", type="file", device="disk")
    _sub(element, "driver", name="qemu", type="qcow2")
    _sub(element, "source", file=str(image.overlay))
    backing = _sub(element, "backingStore", type="file")
    _sub(backing, "format", type=image.base_format)
    _sub(backing, "source", file=str(image.base))
    _sub(element, "target", dev=targets.next("virtio"), bus="virtio")


def _seed_disk(devices: ET.Element, path: Path, targets: _Targets) -> None:
    """The NoCloud seed as a read-only virtio disk: Debian's cloud kernel has no AHCI
    driver, so a CD-ROM on q35's SATA bus would be invisible to it."""
    element = _sub(devices, "disk", type="file", device="disk")
    _sub(element, "driver", name="qemu", type="raw")
    _sub(element, "source", file=str(path))
    _sub(element, "target", dev=targets.next("virtio"), bus="virtio")
    _sub(element, "readonly")
    _sub(element, "serial", "cidata")


def _share(devices: ET.Element, vm_name: str, share: Share) -> None:
    """A virtio-fs device served by the share's companion virtiofsd (not started by
    libvirt: it needs root, see generator/shares.py), through its socket."""
    element = _sub(devices, "filesystem", type="mount")
    _sub(element, "driver", type="virtiofs", queue="1024")
    _sub(element, "source", socket=str(paths.virtiofsd_socket(vm_name, share.tag)))
    _sub(element, "target", dir=share.tag)


def _fw_cfg(domain: ET.Element, files: tuple[tuple[str, Path], ...]) -> None:
    """systemd credentials as fw_cfg files: QEMU's command line names the file, not the value."""
    sysinfo = _sub(domain, "sysinfo", type="fwcfg")
    for cred_id, path in files:
        _sub(sysinfo, "entry", name=FW_CFG_CREDENTIALS + cred_id, file=str(path))


def _user_netdev(vm: VMConfig, number: int) -> str:
    """-netdev user,... of VM's user interface number NUMBER: restrict=, hostfwd=."""
    options = [f"user,id=qunet{number}"]
    if vm.restrict_network:
        options.append("restrict=on")
    if number == 0:
        options += [f"hostfwd={p.hostfwd()}" for p in vm.publish_ports]
    return ",".join(options)


def _qemu_commandline_nics(domain: ET.Element, vm: VMConfig) -> set[int]:
    """User interfaces with published ports or isolation, given to QEMU directly.

    libvirt 9.0 has no element for either (its <portForward> needs the passt backend,
    which it refuses), so these interfaces are QEMU arguments in <qemu:commandline>,
    at fixed slots of the root bus. Returns the indexes of the interfaces done here.
    """
    if not (vm.publish_ports or vm.restrict_network):
        return set()
    user = [i for i, n in enumerate(vm.networks) if n.kind is NetworkKind.USER]
    commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    bus = "pcie.0" if is_q35(vm.machine) else "pci.0"
    macs = vm.macs()
    for number, index in enumerate(user):
        device = (f"virtio-net-pci,netdev=qunet{number},mac={macs[index]},bus={bus},"
                  f"addr={EXTRA_NIC_SLOT + number:#x}")
        for arg in ("-netdev", _user_netdev(vm, number), "-device", device):
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    return set(user)


def _cdrom(devices: ET.Element, path: Path, bus: str, targets: _Targets) -> None:
    element = _sub(devices, "disk", type="file", device="cdrom")
    _sub(element, "driver", name="qemu", type="raw")
    _sub(element, "source", file=str(path))
    _sub(element, "target", dev=targets.next(bus), bus=bus)
    _sub(element, "readonly")


def _cpu(domain: ET.Element, vm: VMConfig, accel: Accel) -> None:
    model = vm.cpu_model
    if model is None:
        model = HOST_CPU_MODELS[0] if accel is Accel.KVM else None
    if model is None:
        return
    if model in HOST_CPU_MODELS:
        if accel is not Accel.KVM:
            raise ConfigError(f"CPUModel={model} needs KVM, and the VM runs under TCG",
                              path=vm.source_path, key="CPUModel")
        _sub(domain, "cpu", mode=model)
    elif model == "max":
        _sub(domain, "cpu", mode="maximum")
    else:
        cpu = _sub(domain, "cpu", mode="custom", match="exact")
        _sub(cpu, "model", model, fallback="forbid")


def _domain_type(plan: Plan) -> str:
    return plan.accel.domain_type


def _nvram(vm: VMConfig, plan: Plan) -> str:
    """A UEFI VM's variables live in its state directory: libvirt copies the firmware's
    template there on first start, and they outlive the runtime directory (the root)."""
    return str(plan.dirs.state / paths.nvram_file(vm.name))


def _take_console(devices: ET.Element, plan: Plan) -> None:
    """Serial port 0 connects to the runner's console socket, so no line is lost;
    libvirt mirrors it as the console again."""
    for cons in devices.findall("console"):
        target = cons.find("target")
        if target is None or target.get("type", "serial") == "serial":
            devices.remove(cons)
    serial = devices.find("serial")
    if serial is None:
        serial = _sub(devices, "serial")
        _sub(serial, "target", port="0")
    serial.attrib.clear()
    serial.set("type", "unix")
    for child in list(serial):
        if child.tag != "target":
            serial.remove(child)
    serial.insert(0, ET.Element("source", mode="connect", path=str(plan.dirs.console_socket)))


def _take_over(vm: VMConfig, plan: Plan) -> ET.Element:
    """A DomainXML= VM's own domain, made ours: name, type, console, agent, NVRAM."""
    assert plan.domain_xml is not None
    domain = copy.deepcopy(plan.domain_xml)
    domain.set("type", _domain_type(plan))
    name = domain.find("name")
    if name is None:
        name = ET.Element("name")
        domain.insert(0, name)
    name.text = vm.name
    devices = domain.find("devices")
    if devices is None:
        devices = _sub(domain, "devices")
    for chan in devices.findall("channel"):
        target = chan.find("target")
        if target is not None and target.get("name") == GUEST_AGENT_CHANNEL:
            chan.set("type", "unix")
            for old in chan.findall("source"):
                chan.remove(old)
            chan.insert(0, ET.Element("source", mode="bind", path=str(plan.dirs.agent_socket)))
    os_ = domain.find("os")
    loader = None if os_ is None else os_.find("loader")
    pflash = loader is not None and loader.get("type") == "pflash"
    if os_ is not None and (os_.get("firmware") == "efi" or pflash):
        nvram = os_.find("nvram")
        if nvram is None:
            nvram = _sub(os_, "nvram")
        if not (nvram.text or "").strip() and not nvram.get("template"):
            nvram.text = _nvram(vm, plan)
    if vm.console is ConsoleMode.JOURNAL:
        _take_console(devices, plan)
    return domain


def build(vm: VMConfig, plan: Plan) -> ET.Element:
    """The final domain tree of VM on this host, as PLAN describes the host."""
    if plan.domain_xml is not None:
        return _take_over(vm, plan)
    domain = ET.Element("domain", type=_domain_type(plan))
    _sub(domain, "name", vm.name)
    _sub(domain, "uuid", vm.domain_uuid())
    # libvirt counts in KiB; round up so that the guest gets at least Memory=.
    _sub(domain, "memory", str(-(-vm.memory // 1024)), unit="KiB")
    _sub(domain, "vcpu", str(vm.cpus))
    if vm.shares:
        # virtiofsd maps the guest's memory: it must be a shared file, not private RAM.
        backing = _sub(domain, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    if plan.credentials:
        _fw_cfg(domain, plan.credentials)

    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=vm.machine)
    if vm.firmware is Firmware.UEFI:
        os_.set("firmware", "efi")
        # libvirt picks OVMF from the firmware descriptors by these features: with
        # Secure Boot, the build with SMM and the variable store holding Microsoft's keys.
        firmware = _sub(os_, "firmware")
        if vm.secure_boot:
            _sub(firmware, "feature", enabled="yes", name="enrolled-keys")
            _sub(firmware, "feature", enabled="yes", name="secure-boot")
            _sub(os_, "loader", secure="yes")
        else:
            _sub(firmware, "feature", enabled="no", name="secure-boot")
        _sub(os_, "nvram", str(_nvram(vm, plan)))
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
    if vm.secure_boot:
        # Secure Boot's variables are only safe from the guest's OS with SMM.
        _sub(features, "smm", state="on")
    _cpu(domain, vm, plan.accel)
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    targets = _Targets()
    if plan.image is not None:
        _image_disk(devices, plan.image, targets)
    for disk, disk_plan in zip(vm.disks, plan.disks, strict=True):
        _disk(devices, disk, disk_plan, targets)
    cdrom_bus = "sata" if is_q35(vm.machine) else "ide"
    for cdrom in vm.cdroms:
        _cdrom(devices, cdrom, cdrom_bus, targets)
    if plan.seed is not None:
        _seed_disk(devices, plan.seed, targets)
    if any(d.bus == "scsi" for d in vm.disks):
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")

    on_commandline = _qemu_commandline_nics(domain, vm)
    for index, (network, mac) in enumerate(zip(vm.networks, vm.macs(), strict=True)):
        if index in on_commandline:
            continue
        interface = _sub(devices, "interface", type=network.kind.interface_type)
        _sub(interface, "mac", address=mac)
        if network.kind is NetworkKind.TAP:
            assert network.target is not None
            _sub(interface, "target", dev=network.target, managed="no")
        elif network.kind is NetworkKind.BRIDGE:
            assert network.target is not None
            _sub(interface, "source", bridge=network.target)
        _sub(interface, "model", type="virtio")

    if vm.console is ConsoleMode.JOURNAL:
        _take_console(devices, plan)
    if (ShutdownMethod.AGENT in vm.shutdown_mode or vm.ready.kind is ReadyKind.AGENT
            or vm.health_cmd is not None):
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind", path=str(plan.dirs.agent_socket))
        _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    for share in vm.shares:
        _share(devices, vm.name, share)
    if vm.tpm:
        # libvirt runs swtpm as the VM's user; its state: paths.tpm_state_dir.
        tpm = _sub(devices, "tpm", model="tpm-crb")
        # persistent_state: libvirt would delete the state with the transient domain.
        _sub(tpm, "backend", type="emulator", version="2.0", persistent_state="yes")
    # Guests starve for entropy under TCG without it; /dev/urandom never blocks.
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")

    return domain



def serialize(domain: ET.Element) -> str:
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def render(vm: VMConfig, plan: Plan) -> str:
    """The domain XML the runner starts: what `qemu-unit render NAME` prints."""
    return serialize(build(vm, plan))
