"""The host plan: everything a VM's domain needs to know about this host, learned once.

`plan(vm)` runs before anything is acquired and is where bad input fails: the
files the VM names (each disk header read once), the accelerator (/dev/kvm
opened once), a DomainXML= file (read, parsed and its host paths checked once),
the directories the runner will use. `domain.build(vm, plan)` turns the VM and
its plan into the final domain tree without looking at the host again.

A feature that prepares something on the host (an overlay, a seed image, a
credential file) adds a field to `Plan`, fills it in `plan()`, and adds the
elements that use it in `domain.build`.

No libvirt here: `qemu-unit render`/`validate` use this as the runner does.
"""

from __future__ import annotations

import os
import socket
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from qemu_unit.config.domainxml import read_domain_xml, xml_paths
from qemu_unit.config.settings import Accel, Disk, VMConfig
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.paths import (
    OVERLAY,
    SEED,
    VIRTIOFSD,
    Dirs,
    finalize_dirs,
    unit_name,
    virtiofsd_socket,
    virtiofsd_unit_name,
)
from qemu_unit.records import NamedTuple
from qemu_unit.vm.qcow2 import read_header

# The sun_path limit; the deepest socket libvirt makes in the root is QEMU's monitor.
SUN_PATH_MAX = 107
MONITOR_SUFFIX = len("/lib/qemu/domain-999-") + 20 + len("/monitor.sock")


class DiskPlan(NamedTuple):
    """What the host says about one Disk=: its format and whether it is a block device."""

    format: str
    block: bool = False


class ImagePlan(NamedTuple):
    """Image=: the VM's qcow2 overlay over the base, and the base's format (never probed)."""

    overlay: Path
    base: Path
    base_format: str


class Plan(NamedTuple):
    """What the host contributes to VM's domain; built by plan(), read by domain.build."""

    accel: Accel  # KVM or TCG, never AUTO
    dirs: Dirs
    disks: tuple[DiskPlan, ...] = ()  # one per VMConfig.disks, in order
    # A DomainXML= VM's own domain, parsed and checked; domain.build takes over a copy.
    domain_xml: ET.Element | None = None
    image: ImagePlan | None = None
    seed: Path | None = None  # the cloud-init NoCloud seed, written by prepare()
    # (ID, file QEMU reads) of each credential; SetCredential= files written by prepare().
    credentials: tuple[tuple[str, Path], ...] = ()


def kvm_problem() -> str | None:
    """Why /dev/kvm cannot be used by this process, or None when it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def key_error(vm: VMConfig, key: str, message: str) -> ConfigError:
    """MESSAGE about VM's KEY: at its assignment, else (a default) in VM's file."""
    entry = vm.origin(key)
    return ConfigError(message, entry=entry, path=None if entry else vm.source_path, key=key)


def finalize_accel(vm: VMConfig, xml: ET.Element | None, *, probe: bool = True) -> Accel:
    """The one accelerator decision: KVM where asked for (or auto) and /dev/kvm opens.

    A DomainXML= VM with Accel=auto runs as its <domain type=> says. Without PROBE
    nothing is opened: the VM is taken as its configuration says (validate).
    """
    wanted = vm.accel
    if wanted is Accel.AUTO and xml is not None:
        wanted = Accel.for_domain_type(xml.get("type"))
        if wanted is Accel.KVM and probe and (problem := kvm_problem()) is not None:
            raise ConfigError(f"<domain type='kvm'> but KVM is unusable ({problem})",
                              path=vm.domain_xml)
        return wanted
    if wanted is Accel.TCG or not probe:
        return Accel.KVM if wanted is Accel.KVM else Accel.TCG
    problem = kvm_problem()
    if problem is None:
        return Accel.KVM
    if wanted is Accel.KVM:
        raise key_error(vm, "Accel", f"KVM requested but unusable ({problem})")
    from qemu_unit.log import log  # here: the generator imports this module for XML VMs

    log.warning("KVM is unusable (%s); falling back to TCG, which is much slower", problem)
    return Accel.TCG


def check_files(vm: VMConfig) -> None:
    """Every file VM's keys name must exist and be readable; ConfigError if not."""
    for ref in vm.files:
        problem = None
        if not ref.path.exists():
            problem = "does not exist"
        elif ref.path.is_dir():
            problem = "is a directory"
        elif not os.access(ref.path, os.R_OK):
            problem = "is not readable"
        if problem is not None:
            if ref.entry is None:
                raise ConfigError(problem, path=ref.path)
            raise ConfigError(f"{ref.path} {problem}", entry=ref.entry)


def _disk_error(disk: Disk, message: str) -> ConfigError:
    entry = disk.entry
    return ConfigError(message, path=entry.path if entry else None,
                       line=entry.line if entry else None, key=entry.key if entry else "Disk")


def detect_format(disk: Disk) -> str:
    """DISK's format: as given, else qcow2 or raw from the file's first bytes.

    A disk the guest can write never chooses its own format (the guest could have written
    the header): without format= a writable disk is raw unless it starts with the qcow2
    magic, which is refused (write format=qcow2). A read-only disk may be probed. Any qcow2
    (given or probed) with an external data file or unknown incompatible features is
    refused, and a probed one with a backing file. An unreadable file counts as raw: QEMU
    will say why it cannot open it.
    """
    if disk.format not in (None, "qcow2"):
        return disk.format
    try:
        header = read_header(disk.path)
    except OSError:
        header = None
    if header is None:
        return disk.format or "raw"  # format=qcow2 on no qcow2: QEMU says what is wrong
    if (problem := header.problem()) is not None:
        raise _disk_error(disk, f"{disk.path}: {problem}; refused")
    if disk.format == "qcow2":
        return "qcow2"
    if not disk.readonly:
        # A guest writing a raw disk could have planted this header.
        raise _disk_error(disk, f"{disk.path} starts with a qcow2 header but has no format=: "
                                "write format=qcow2 if it is a qcow2 image (the format of a "
                                "writable disk is never read from its contents)")
    if header.backing_file:
        # A probed backing file is how a guest writing a raw disk could read host files.
        raise _disk_error(disk, f"{disk.path} is a qcow2 image with a backing file: "
                                "write format=qcow2")
    return "qcow2"


def _is_block(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def plan_disk(disk: Disk) -> DiskPlan:
    return DiskPlan(detect_format(disk), _is_block(disk.path))


# -- DomainXML= -----------------------------------------------------------------------------


def check_xml_paths(root: ET.Element, path: Path | str) -> None:
    """The host paths the domain names exist as what they must be: a clear error here
    beats QEMU's exit inside libvirt later."""
    for p in xml_paths(root):
        problem = None
        if not os.path.exists(p.path):
            problem = "missing"
        elif p.kind == "dir" and not os.path.isdir(p.path):
            problem = "not a directory"
        elif p.kind != "dir" and os.path.isdir(p.path):
            problem = "a directory"
        elif p.kind == "exec" and not os.access(p.path, os.X_OK):
            problem = "not executable"
        elif not os.access(p.path, os.R_OK):
            problem = "not readable"
        if problem is not None:
            raise ConfigError(f"<{p.tag}> names {p.path}, which is {problem}", path=path)


# SecureBoot=: the OVMF build libvirt picks for secure-boot + enrolled-keys (package ovmf).
SECURE_BOOT_FIRMWARE = (Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
                        Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"))


def check_devices(vm: VMConfig) -> None:
    """What TPM=, SecureBoot= and Share= need from the host is there; one line if not."""
    if vm.tpm:
        import shutil  # only TPM= needs it: not at every start

        missing = [t for t in ("swtpm", "swtpm_setup") if shutil.which(t) is None]
        if missing:
            raise key_error(vm, "TPM", f"{' and '.join(missing)} not found: install the "
                                       "Debian packages swtpm and swtpm-tools")
    if vm.secure_boot:
        for path in SECURE_BOOT_FIRMWARE:
            if not path.is_file():
                raise key_error(vm, "SecureBoot",
                                f"{path} not found: install the Debian package ovmf")
    for share in vm.shares:
        if not os.access(VIRTIOFSD, os.X_OK):
            raise ConfigError(f"{VIRTIOFSD} not found: install the Debian package "
                              "qemu-system-common", entry=share.entry)
        if not share.path.is_dir():
            problem = "is not a directory" if share.path.exists() else "does not exist"
            raise ConfigError(f"{share.path} {problem}", entry=share.entry)


def check_share_daemons(vm: VMConfig) -> None:
    """Each Share='s virtiofsd listens now (its companion unit started it first).

    Not part of plan(): `qemu-unit validate`/`render` need no running daemon.
    """
    for share in vm.shares:
        sock = virtiofsd_socket(vm.name, share.tag)
        try:
            listening = stat.S_ISSOCK(os.stat(sock).st_mode)
        except OSError:
            listening = False
        if not listening:
            unit = virtiofsd_unit_name(vm.name, share.tag)
            raise QemuUnitError(
                f"Share= {share.tag}: no virtiofsd listens at {sock}: the VM's unit starts it "
                f"(systemctl start {unit_name(vm.name)} starts {unit} first)"
            )


# -- the plan -------------------------------------------------------------------------------


def plan(
    vm: VMConfig, dirs: Dirs | None = None, *, accel: Accel | None = None, probe: bool = True
) -> Plan:
    """Learn what VM needs from this host; ConfigError for anything that cannot work.

    The file checks (check_files, check_plan) around plan_vm. DIRS default to the
    runner's (finalize_dirs). ACCEL, when given, is taken as decided (tests); without
    PROBE, /dev/kvm is not opened and the VM is taken as its configuration says
    (validate).
    """
    check_files(vm)
    check_devices(vm)
    result = plan_vm(vm, dirs or finalize_dirs(vm.name), accel=accel, probe=probe)
    check_plan(vm, result)
    return result


def plan_vm(vm: VMConfig, dirs: Dirs, *, accel: Accel | None = None,
            probe: bool = True) -> Plan:
    """VM's plan without checking that its files exist (fixtures name files this host
    does not have): disk headers and a DomainXML= file are read if they can be."""
    if accel is Accel.AUTO:
        raise QemuUnitError("a plan needs a decided accelerator (kvm or tcg)")
    if accel is not None and vm.accel is not Accel.AUTO and vm.accel is not accel:
        raise QemuUnitError(f"the VM says Accel={vm.accel}, cannot plan it for {accel}")
    if len(os.fspath(dirs.root)) + MONITOR_SUFFIX > SUN_PATH_MAX:
        raise ConfigError(
            f"embed root {dirs.root} is too long for QEMU's monitor socket path "
            f"({SUN_PATH_MAX} bytes max): use a shorter VM name"
        )
    xml = read_domain_xml(vm.domain_xml) if vm.domain_xml is not None else None
    disks = tuple(plan_disk(d) for d in vm.disks)
    if accel is None:
        accel = finalize_accel(vm, xml, probe=probe)
    return Plan(accel=accel, dirs=dirs, disks=disks, domain_xml=xml,
                **guest_files(vm, dirs, probe=probe))


def check_plan(vm: VMConfig, plan: Plan) -> None:
    """The host paths a DomainXML= domain names are there (check_files did the VM's own)."""
    if plan.domain_xml is not None and vm.domain_xml is not None:
        check_xml_paths(plan.domain_xml, vm.domain_xml)


def overlay_path(vm: VMConfig, dirs: Dirs) -> Path:
    return (dirs.root if vm.ephemeral else dirs.state) / OVERLAY


def pulled_base(vm: VMConfig) -> tuple[Path, str] | None:
    """(cached file, format) an Image= URL resolves to now; None when not pulled yet."""
    if vm.image_source is None:
        return None
    from qemu_unit.images.cache import Cache

    cache = Cache()
    ref = cache.read_ref(vm.image_source.key())
    if ref is None or not cache.blob(ref.digest).exists():
        return None
    return cache.blob(ref.digest), ref.format


def guest_files(vm: VMConfig, dirs: Dirs, *, probe: bool = True) -> dict[str, Any]:
    """The Plan fields of the files prepare() makes for VM: overlay, seed, credentials
    (the base image's header is read here, once; an Image= URL's format was read when
    it was pulled). Without PROBE an Image= URL not pulled yet is no error (validate)."""
    image = None
    if vm.image is not None:
        base_format = detect_format(Disk(vm.image, readonly=True, entry=vm.origin("Image")))
        image = ImagePlan(overlay_path(vm, dirs), vm.image, base_format)
    elif vm.image_source is not None:
        pulled = pulled_base(vm)
        if pulled is None and probe:
            raise key_error(vm, "Image", f"{vm.image_source.url} is not in the image cache: "
                            "start the unit (it pulls it) or run qemu-unit image pull")
        if pulled is not None:
            image = ImagePlan(overlay_path(vm, dirs), *pulled)
    files: tuple[tuple[str, Path], ...] = ()
    if vm.credentials:
        from qemu_unit.vm.credentials import planned_files

        files = tuple(planned_files(vm, dirs.root))
    return {"image": image, "seed": dirs.root / SEED if vm.has_seed else None,
            "credentials": files}


def check_ports(vm: VMConfig) -> None:
    """Each PublishPort= host port must be free now: one clear line beats QEMU's failure.

    Not part of plan(): `qemu-unit render` of a running VM would find its own ports taken.
    """
    for port in vm.publish_ports:
        kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            # As QEMU binds it: a port in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((port.host_ip or "0.0.0.0", port.host_port))
            except OSError as e:
                address = f"{port.host_ip or '*'}:{port.host_port}/{port.protocol}"
                raise ConfigError(f"host port {address} is not available: {e.strerror}",
                                  entry=port.entry, key="PublishPort") from None
