"""`qemu-unit kube generate|play`: a VM handed to KubeVirt, and taken back.

`generate(vm)` turns a VMConfig into Kubernetes documents: a `kubevirt.io/v1`
VirtualMachine, a Secret for SSH keys and one for credentials, a Service per
PublishPort=. `play(documents)` turns such documents back into a .vm file and
its seed files. Both are pure (no file written) and return, one line each,
what they could not express, as Podman's `kube generate`/`kube play` do.

What KubeVirt has no field for but a round trip needs (the VM's own name when
it is not a DNS label, the local image's path, a port's host address) rides
in `qemu-unit.io/` annotations. Everything else play does not understand is
left over after it took what it knows, and each leftover is named.
"""

from __future__ import annotations

import base64
import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from qemu_unit.config import settings
from qemu_unit.config.names import check_name
from qemu_unit.config.settings import (
    Accel,
    ConsoleMode,
    Firmware,
    NetworkKind,
    ReadyKind,
    ShutdownMethod,
    VMConfig,
)
from qemu_unit.config.unitfile import Entry, escape_specifiers, format_line
from qemu_unit.errors import ConfigError, QemuUnitError

API_VERSION = "kubevirt.io/v1"
CDI_DEFAULT_STORAGE = "ReadWriteOnce"
ANNOTATION = "qemu-unit.io/"
NAME_ANNOTATION = ANNOTATION + "name"
IMAGE_ANNOTATION = ANNOTATION + "image"
HOST_IP_ANNOTATION = ANNOTATION + "host-ip"
DESCRIPTION_ANNOTATION = ANNOTATION + "description"
# Labels the VirtualMachine's pods carry; each Service selects on it.
VM_LABEL = ANNOTATION + "vm"
# Exit status of --strict when something cannot be expressed (EX_DATAERR).
EX_INEXPRESSIBLE = 65

# runStrategy <-> [Install] (enabled: start at boot) + [Service] Restart=
# (the template unit's default is Restart=on-failure).
RUN_STRATEGIES = {
    ("always", True): "Always",
    ("on-failure", True): "RerunOnFailure",
    ("no", True): "Once",
}
KUBEVIRT_BUSES = ("virtio", "sata", "scsi")
KUBEVIRT_CACHES = ("none", "writethrough", "writeback")
DEFAULT_TARGET = "multi-user.target"

# [VM] keys with no KubeVirt counterpart at all, and why (a value other than the
# default is named).
UNSUPPORTED = {
    "Kernel": "a host file; KubeVirt boots a kernel only from a container image "
              "(firmware.kernelBoot.container)",
    "Initrd": "a host file; KubeVirt boots an initrd only from a container image",
    "KernelCmdline": "only with a kernel from a container image (firmware.kernelBoot)",
    "ConsoleLog": "KubeVirt keeps no console.log (spec.domain.devices.logSerialConsole "
                  "is the cluster's choice)",
    "ConsoleRateLimitIntervalSec": "KubeVirt has no console rate limit",
    "ConsoleRateLimitBurst": "KubeVirt has no console rate limit",
    "RestrictNetwork": "KubeVirt isolates a VM with a NetworkPolicy, not a VM field",
    "AllowHostLoopback": "what a pod reaches of its node is the cluster's network policy, "
                         "not a VM field",
    "LoadCredential": "a file or the unit's own credential: not copied into a Secret",
    "DomainXML": "KubeVirt takes no libvirt domain XML",
    # Issue 19: KubeVirt has each (devices.tpm.persistent, firmware.bootloader.efi.secureBoot,
    # virtiofs filesystems), not converted yet.
    "TPM": "not converted (KubeVirt: spec.domain.devices.tpm with persistent: true)",
    "SecureBoot": "not converted (KubeVirt: firmware.bootloader.efi.secureBoot with SMM)",
    "Share": "a host directory: KubeVirt shares volumes (PVC, ConfigMap) through virtiofs",
    "ShareMount": "goes with Share=: the guest mounts KubeVirt's virtiofs volumes itself",
    # Image= URLs (issue 17): CDI imports a URL itself, without these checks.
    "ImageChecksum": "CDI's http import checks no digest",
    "ImageChecksums": "CDI's http import reads no sums file",
    "ImageSignature": "CDI's http import checks no signature",
    "ImageKeyring": "CDI's http import checks no signature",
    "ImageVerify": "CDI's http import checks nothing",
    # Health checks (issue 18): KubeVirt's counterpart is a probe with exec through the
    # guest agent, with other timing fields; not converted.
    "HealthCmd": "not converted: KubeVirt's livenessProbe.exec (guest agent) is the counterpart",
    "HealthInterval": "not converted (see HealthCmd)",
    "HealthTimeout": "not converted (see HealthCmd)",
    "HealthRetries": "not converted (see HealthCmd)",
    "HealthStartPeriod": "not converted (see HealthCmd)",
    "HealthOnFailure": "not converted (see HealthCmd)",
    "AutoUpdate": "KubeVirt updates no VM's image by itself",
    "HostShutdown": "a node's shutdown is the cluster's: KubeVirt evicts or live-migrates",
    "SnapshotSchedule": "KubeVirt snapshots are VirtualMachineSnapshot objects, not a VM field",
    "SnapshotKeep": "KubeVirt snapshots are VirtualMachineSnapshot objects, not a VM field",
    "BackupSchedule": "a cluster's backups are its own (e.g. Velero), not a VM field",
    "BackupTo": "a cluster's backups are its own (e.g. Velero), not a VM field",
    "BackupKeep": "a cluster's backups are its own (e.g. Velero), not a VM field",
}
# [VM] keys generate() converts (a value it cannot convert is named, as above).
EXPRESSED = (
    "Memory", "CPUs", "Machine", "Accel", "CPUModel", "Firmware", "Image", "Ephemeral",
    "DiskSize", "Disk", "CDROM", "Network", "MAC", "UUID", "Console", "ShutdownMode",
    "ShutdownTimeout", "Ready", "PublishPort", "UserData", "SSHAuthorizedKey", "Hostname",
    "NetworkConfig", "SetCredential",
)


@dataclass
class Conversion:
    """Documents (generate) or files (play), and what could not be expressed."""

    documents: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def k8s_name(name: str) -> str:
    """NAME as a DNS-1123 label (what a VirtualMachine's name must be)."""
    return settings.name_label(name)


def quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity with the largest exact binary suffix."""
    for suffix, power in (("Ei", 6), ("Pi", 5), ("Ti", 4), ("Gi", 3), ("Mi", 2), ("Ki", 1)):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{suffix}"
    return str(size)


_QUANTITY = re.compile(r"\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][-+]?[0-9]+)?")
_FACTORS = {"m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "P": 10**15, "E": 10**18} | {f"{s}i": 1024**(i + 1) for i, s in enumerate("KMGTPE")}


def parse_quantity(value: object) -> int | None:
    """A Kubernetes quantity in bytes; None when it is not a whole number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _QUANTITY.fullmatch(str(value))
    if not match:
        return None
    number, suffix = Fraction(match.group(1)), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        number *= Fraction(10) ** int(suffix[1:])
    else:
        number *= _FACTORS.get(suffix, 1)
    return int(number) if number.denominator == 1 else None


def _enabled(vm: VMConfig) -> bool:
    return bool(vm.wanted_by or vm.required_by)


def _restart(vm: VMConfig) -> str:
    """[Service] Restart= in effect (the template's on-failure unless set)."""
    values = [e.value for e in vm.service if e.key == "Restart"]
    return values[-1] if values and values[-1] else "on-failure"


class _Generator:
    def __init__(self, vm: VMConfig, image_ref: str | None) -> None:
        self.vm = vm
        self.image_ref = image_ref
        self.name = k8s_name(vm.name)
        self.out = Conversion()

    def note(self, key: str, text: str, entry: Entry | None = None) -> None:
        entry = entry or self.vm.origin(key)
        where = f"{entry.path}:{entry.line}" if entry and entry.line else str(self.vm.source_path)
        self.out.notes.append(f"{where}: {key}=: {text}")

    def run(self) -> Conversion:
        vm = self.vm
        if vm.domain_xml is not None:
            raise ConfigError(f"a DomainXML= VM cannot be converted: {UNSUPPORTED['DomainXML']}",
                              path=vm.source_path)
        self.unsupported_keys()
        annotations = {} if self.name == vm.name else {NAME_ANNOTATION: vm.name}
        spec: dict[str, Any] = {"domain": self.domain(annotations)}
        volumes, templates = self.volumes(spec["domain"]["devices"], annotations)
        spec["networks"] = self.networks(spec["domain"]["devices"])
        spec["terminationGracePeriodSeconds"] = self.grace_period()
        if vm.ready.kind is ReadyKind.AGENT:
            spec["readinessProbe"] = {"guestAgentPing": {}, "periodSeconds": 1}
        elif vm.ready.kind is ReadyKind.CONSOLE:
            self.note("Ready", "KubeVirt has no readiness from console output")
        elif vm.ready.kind is ReadyKind.HEALTHY:
            self.note("Ready", "healthy is not converted (see HealthCmd)")
        if vm.shutdown_mode != (ShutdownMethod.ACPI,):
            self.note("ShutdownMode", "KubeVirt shuts a VM down by ACPI only")
        if vm.accel is Accel.TCG:
            self.note("Accel", "KubeVirt runs on KVM; emulation is the cluster's choice "
                               "(developerConfiguration.useEmulation)")
        volumes += self.seed(spec, annotations)
        volumes += self.credentials(spec["domain"]["devices"])
        spec["volumes"] = volumes
        description = [e for e in vm.unit if e.key == "Description"]
        if description and description[-1].value:
            annotations[DESCRIPTION_ANNOTATION] = description[-1].value
        self.unit_entries()
        metadata: dict[str, Any] = {"name": self.name}
        if annotations:
            metadata["annotations"] = annotations
        vm_spec: dict[str, Any] = {"runStrategy": self.run_strategy()}
        if templates:
            vm_spec["dataVolumeTemplates"] = templates
        vm_spec["template"] = {"metadata": {"labels": {VM_LABEL: self.name}}, "spec": spec}
        self.out.documents.insert(0, {
            "apiVersion": API_VERSION, "kind": "VirtualMachine",
            "metadata": metadata, "spec": vm_spec,
        })
        self.out.documents += self.services()
        return self.out

    def unsupported_keys(self) -> None:
        for key, why in UNSUPPORTED.items():
            entry = self.vm.origin(key)
            if entry is None:
                continue
            row = settings.BY_NAME[key]
            if row.repeatable or getattr(self.vm, row.field) != settings.default_value(key):
                self.note(key, why)

    def domain(self, annotations: dict[str, str]) -> dict[str, Any]:
        vm = self.vm
        # libvirt gives a <vcpu> without <topology> to QEMU as N sockets of one core.
        cpu: dict[str, Any] = {"sockets": vm.cpus, "cores": 1, "threads": 1}
        if vm.cpu_model:
            cpu["model"] = vm.cpu_model
        if vm.machine != "q35" and not vm.machine.startswith("pc-q35"):
            self.note("Machine", f"KubeVirt runs q35 machines on x86, not {vm.machine}")
        bootloader = ({"efi": {"secureBoot": False}} if vm.firmware is Firmware.UEFI
                      else {"bios": {}})
        return {
            "cpu": cpu,
            "memory": {"guest": quantity(vm.memory)},
            "machine": {"type": vm.machine},
            # The same SMBIOS UUID: a guest (and cloud-init) sees the same machine.
            "firmware": {"uuid": vm.domain_uuid(), "bootloader": bootloader},
            "devices": {"autoattachSerialConsole": vm.console is ConsoleMode.JOURNAL,
                        "disks": [], "interfaces": []},
        }

    def volumes(
        self, devices: dict[str, Any], annotations: dict[str, str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        vm = self.vm
        volumes: list[dict[str, Any]] = []
        templates: list[dict[str, Any]] = []

        def add(name: str, target: dict[str, Any], volume: dict[str, Any]) -> None:
            devices["disks"].append({"name": name, **target,
                                     "bootOrder": len(devices["disks"]) + 1})
            volumes.append({"name": name, **volume})

        if vm.image_source is not None:
            self.note("Image", f"a URL ({vm.image_source.url}): import it with a CDI "
                               "DataVolume (source http) or name a container image")
        if vm.image is not None:
            annotations[IMAGE_ANNOTATION] = str(vm.image)
            image = self.image_volume(templates)
            if image is not None:
                add("image", {"disk": {"bus": "virtio"}}, image)
        for index, disk in enumerate(vm.disks):
            entry = disk.entry
            if disk.format != "raw":
                self.note("Disk", f"{disk.path}: a KubeVirt hostDisk is a raw image; "
                                  "give format=raw if it is one", entry)
                continue
            if disk.bus not in KUBEVIRT_BUSES:
                self.note("Disk", f"{disk.path}: KubeVirt has no bus={disk.bus}", entry)
                continue
            target: dict[str, Any] = {"disk": {"bus": disk.bus}}
            if disk.readonly:
                target["disk"]["readonly"] = True
            if disk.cache in KUBEVIRT_CACHES:
                target["cache"] = disk.cache
            elif disk.cache not in (None, "default"):
                self.note("Disk", f"{disk.path}: KubeVirt has no cache={disk.cache}", entry)
            add(f"disk{index}", target, {"hostDisk": {"path": str(disk.path), "type": "Disk"}})
        for index, cdrom in enumerate(vm.cdroms):
            add(f"cdrom{index}", {"cdrom": {"bus": "sata", "readonly": True}},
                {"hostDisk": {"path": str(cdrom), "type": "Disk"}})
        return volumes, templates

    def image_volume(self, templates: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Image=: a containerDisk (Ephemeral=yes) or a DataVolume imported from it."""
        vm = self.vm
        if not self.image_ref:
            self.note("Image", "a local file: name a container image holding it "
                               "(a containerDisk) with --image-ref")
            return None
        if vm.ephemeral:
            # Ephemeral=yes and a containerDisk alike: every start is a first boot.
            return {"containerDisk": {"image": self.image_ref}}
        # A persistent overlay: KubeVirt imports the image into a volume of its own.
        storage: dict[str, Any] = {"accessModes": [CDI_DEFAULT_STORAGE]}
        size = vm.disk_size or _image_size(vm.image)
        if size is None:
            self.note("Image", f"cannot read {vm.image}'s size for the DataVolume: give "
                               "DiskSize=")
        else:
            storage["resources"] = {"requests": {"storage": quantity(size)}}
        volume = f"{self.name}-image"
        templates.append({
            "metadata": {"name": volume},
            "spec": {"source": {"registry": {"url": f"docker://{self.image_ref}"}},
                     "storage": storage},
        })
        return {"dataVolume": {"name": volume}}

    def networks(self, devices: dict[str, Any]) -> list[dict[str, Any]]:
        vm = self.vm
        if not vm.networks:
            devices["autoattachPodInterface"] = False
            return []
        networks: list[dict[str, Any]] = []
        for index, (network, mac) in enumerate(zip(vm.networks, vm.macs(), strict=True)):
            if network.kind is not NetworkKind.USER:
                self.note("Network", f"{network.kind}:{network.target} needs the host's "
                                     "network; KubeVirt attaches to networks by Multus")
                continue
            if networks:
                self.note("Network", "KubeVirt has one pod network; a second user "
                                     f"interface (#{index + 1}) is left out")
                continue
            interface: dict[str, Any] = {"name": "default", "masquerade": {},
                                         "model": "virtio", "macAddress": mac}
            if vm.publish_ports:
                interface["ports"] = [{"port": p.guest_port, "protocol": p.protocol.upper()}
                                      for p in vm.publish_ports]
            devices["interfaces"].append(interface)
            networks.append({"name": "default", "pod": {}})
        return networks

    def grace_period(self) -> int:
        timeout = self.vm.shutdown_timeout
        if timeout != int(timeout):
            self.note("ShutdownTimeout", f"KubeVirt's grace period is whole seconds: "
                                         f"{math.ceil(timeout)}s")
        return math.ceil(timeout)

    def seed(self, spec: dict[str, Any], annotations: dict[str, str]) -> list[dict[str, Any]]:
        """The cloud-init NoCloud seed: user and network data inline, keys in a Secret."""
        vm = self.vm
        if not vm.has_seed:
            return []
        from qemu_unit.vm import seed

        contents = seed.from_vm(vm)
        hostname = contents.hostname
        if "." in hostname:
            self.note("Hostname", f"KubeVirt's hostname is one label: {hostname.split('.')[0]}")
        spec["hostname"] = hostname.split(".")[0]
        nocloud: dict[str, Any] = {}
        for key, data, text_field in (("userData", contents.user_data, "userData"),
                                      ("networkData", contents.network_config, "networkData")):
            if data is None:
                continue
            try:
                nocloud[text_field] = data.decode()
            except UnicodeDecodeError:
                nocloud[f"{key}Base64"] = base64.b64encode(data).decode()
        if "userData" not in nocloud and "userDataBase64" not in nocloud:
            nocloud["userData"] = seed.EMPTY_USER_DATA.decode()
        if contents.ssh_keys:
            secret = f"{self.name}-ssh"
            self.out.documents.append(_secret(secret, {
                f"key{i}": key for i, key in enumerate(contents.ssh_keys)}))
            spec["accessCredentials"] = [{"sshPublicKey": {
                "source": {"secret": {"secretName": secret}},
                "propagationMethod": {"noCloud": {}},
            }}]
        spec["domain"]["devices"]["disks"].append({"name": "cloudinit",
                                                   "disk": {"bus": "virtio"}})
        return [{"name": "cloudinit", "cloudInitNoCloud": nocloud}]

    def credentials(self, devices: dict[str, Any]) -> list[dict[str, Any]]:
        """SetCredential=: a Secret, attached as a disk (systemd does not import it)."""
        values = {c.id: c.value for c in self.vm.credentials if c.value is not None}
        if not values:
            return []
        for cred in self.vm.credentials:
            if cred.value is not None:
                self.note("SetCredential", f"{cred.id}: in the Secret "
                          f"{self.name}-credentials, a disk in the guest; systemd in the "
                          "guest does not import it as a credential", cred.entry)
        secret = f"{self.name}-credentials"
        self.out.documents.append(_secret(secret, values))
        devices["disks"].append({"name": "credentials", "disk": {"bus": "virtio"}})
        return [{"name": "credentials", "secret": {"secretName": secret}}]

    def unit_entries(self) -> None:
        for section, entries, known in (("Unit", self.vm.unit, ("Description",)),
                                        ("Service", self.vm.service, ("Restart",)),
                                        ("Install", self.vm.install, ("WantedBy", "RequiredBy"))):
            for entry in entries:
                if entry.key not in known:
                    self.note(f"[{section}] {entry.key}", "a systemd unit setting; KubeVirt "
                                                          "has no counterpart", entry)
        targets = [t for t in (*self.vm.wanted_by, *self.vm.required_by) if t != DEFAULT_TARGET]
        for target in targets:
            self.note("[Install] WantedBy", f"{target}: KubeVirt starts a VM with the cluster "
                                            "(runStrategy), not with a target")

    def run_strategy(self) -> str:
        restart = _restart(self.vm)
        if not _enabled(self.vm):
            if restart != "on-failure":
                self.note("[Service] Restart", "a VM that is not enabled runs with "
                                               "runStrategy Manual, which never restarts it")
            return "Manual"
        strategy = RUN_STRATEGIES.get((restart, True))
        if strategy is None:
            self.note("[Service] Restart", f"Restart={restart} has no runStrategy; "
                                           "RerunOnFailure is the nearest")
            return "RerunOnFailure"
        return strategy

    def services(self) -> list[dict[str, Any]]:
        services = []
        for port in self.vm.publish_ports:
            metadata: dict[str, Any] = {"name": f"{self.name}-{port.protocol}-{port.host_port}"}
            if port.host_ip:
                metadata["annotations"] = {HOST_IP_ANNOTATION: port.host_ip}
            if not port.host_ip.startswith("127."):
                where = port.host_ip or "every address"
                self.note("PublishPort", f"{port.host_port} on {where} of the host: the "
                          "Service is ClusterIP (inside the cluster); a NodePort or "
                          "LoadBalancer Service exposes it further", port.entry)
            services.append({
                "apiVersion": "v1", "kind": "Service", "metadata": metadata,
                "spec": {"type": "ClusterIP", "selector": {VM_LABEL: self.name},
                         "ports": [{"protocol": port.protocol.upper(), "port": port.host_port,
                                    "targetPort": port.guest_port}]},
            })
        return services


def _secret(name: str, values: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "type": "Opaque", "stringData": values}


def _image_size(path: Path | None) -> int | None:
    from qemu_unit.vm.image import virtual_size

    try:
        return virtual_size(path) if path is not None else None
    except OSError:
        return None


def generate(vm: VMConfig, *, image_ref: str | None = None) -> Conversion:
    """The KubeVirt documents for VM, and one note per thing they cannot say."""
    return _Generator(vm, image_ref).run()


# --- play: documents -> .vm ------------------------------------------------------------


# Objects play reads into: left empty once read, they say nothing more.
_CONTAINERS = frozenset((
    "", "metadata", "annotations", "labels", "spec", "template", "domain", "devices", "cpu",
    "memory", "machine", "firmware", "bootloader", "efi", "resources", "requests", "disk",
    "cdrom", "storage", "source", "registry", "hostDisk", "containerDisk", "dataVolume",
    "secret", "sshPublicKey", "propagationMethod", "readinessProbe", "selector",
))


class _Leftovers:
    """Takes fields out of a copy of a document; whatever is not taken is named."""

    def __init__(self, document: dict[str, Any], what: str) -> None:
        self.doc = copy.deepcopy(document)
        self.what = what

    def names(self) -> list[str]:
        out: list[str] = []

        def walk(value: Any, path: str, key: str) -> None:
            if isinstance(value, dict) and value:
                for child_key, child in value.items():
                    walk(child, f"{path}.{child_key}" if path else str(child_key), child_key)
            elif isinstance(value, list) and value:
                for i, child in enumerate(value):
                    walk(child, f"{path}[{i}]", key)
            elif value == {} and key not in _CONTAINERS:
                out.append(path)  # a marker such as features.acpi: {} means something
            elif value not in ({}, [], None):
                out.append(path)

        walk(self.doc, "", "")
        return [f"{self.what}: {p}: not expressible in a .vm file" for p in out]


def _take(d: Any, *keys: str, default: Any = None) -> Any:
    """d[k1][k2]... removed from D (emptied parents stay and are ignored)."""
    for key in keys[:-1]:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    if not isinstance(d, dict):
        return default
    return d.pop(keys[-1], default)


class _Player:
    def __init__(self, documents: Iterable[Any], directory: Path) -> None:
        self.directory = directory
        self.out = Conversion()
        self.lines: dict[str, list[str]] = {"Unit": [], "VM": [], "Service": [], "Install": []}
        self.vms: list[dict[str, Any]] = []
        self.secrets: dict[str, dict[str, Any]] = {}
        self.services: list[dict[str, Any]] = []
        self.others: list[str] = []
        self.nocloud: dict[str, Any] = {}
        for doc in documents:
            if not isinstance(doc, dict):
                continue
            kind, api = doc.get("kind"), doc.get("apiVersion")
            name = (doc.get("metadata") or {}).get("name", "?")
            if kind == "VirtualMachine" and api == API_VERSION:
                self.vms.append(doc)
            elif kind == "Secret" and api == "v1":
                self.secrets[name] = doc
            elif kind == "Service" and api == "v1":
                self.services.append(doc)
            else:
                self.others.append(f"{kind} {name}: not expressible in a .vm file")

    def set(self, key: str, value: str, section: str = "VM") -> None:
        row = settings.BY_NAME.get(key) if section == "VM" else None
        if row is not None and row.specifiers:
            value = escape_specifiers(value)
        self.lines[section].append(format_line(key, value))

    def run(self) -> tuple[str, Conversion]:
        if len(self.vms) != 1:
            raise QemuUnitError(f"expected one {API_VERSION} VirtualMachine, found "
                                f"{len(self.vms)}")
        self.out.notes += self.others
        doc = _Leftovers(self.vms[0], "VirtualMachine")
        vm = doc.doc
        _take(vm, "apiVersion")
        _take(vm, "kind")
        _take(vm, "status")
        meta = vm.get("metadata") or {}
        kname = _take(meta, "name") or "vm"
        annotations = meta.get("annotations") or {}
        name = check_name(_take(annotations, NAME_ANNOTATION) or kname)
        for key in ("namespace", "creationTimestamp", "labels"):
            _take(meta, key)
        description = _take(annotations, DESCRIPTION_ANNOTATION)
        if description:
            self.set("Description", description, "Unit")
        image_path = _take(annotations, IMAGE_ANNOTATION)
        spec = vm.get("spec") or {}
        strategy = _take(spec, "runStrategy")
        running = _take(spec, "running")
        if strategy is None and running is not None:
            strategy = "Always" if running else "Halted"
        self.run_strategy(strategy or "Halted")
        templates = {t.get("metadata", {}).get("name"): t
                     for t in _take(spec, "dataVolumeTemplates", default=[]) or []}
        template = spec.get("template") or {}
        _take(template, "metadata", "labels")
        vmi = template.get("spec") or {}
        domain = vmi.get("domain") or {}
        self.domain(domain)
        grace = _take(vmi, "terminationGracePeriodSeconds")
        if grace is not None and grace != 60:
            self.set("ShutdownTimeout", f"{grace}s")
        probe = _take(vmi, "readinessProbe")
        if probe is not None:
            if "guestAgentPing" in probe:
                _take(probe, "guestAgentPing")
                _take(probe, "periodSeconds")
                self.set("Ready", "agent")
            if probe:
                vmi["readinessProbe"] = probe  # named as leftovers
        devices = domain.get("devices") or {}
        disks = {d.get("name"): d for d in devices.get("disks") or []}
        hostname = _take(vmi, "hostname")
        seeded = False
        for volume in sorted(_take(vmi, "volumes", default=[]) or [],
                             key=lambda v: _boot_order(disks.get(v.get("name"), {}))):
            seeded |= self.volume(volume, disks, templates, image_path, name)
        if seeded or hostname:
            self.seed(vmi, name, hostname, seeded)
        leftovers = [d for d in disks.values() if d]
        devices["disks"] = leftovers
        self.interfaces(vmi, devices)
        for t in templates.values():
            if t:
                self.out.notes.append(f"dataVolumeTemplate {t.get('metadata', {}).get('name')}: "
                                      "not used by a volume")
        self.out.notes += doc.names()
        for service in self.services:
            self.service(service, kname)
        text = "".join(f"[{section}]\n" + "".join(lines) + "\n"
                       for section, lines in self.lines.items() if lines)
        self.out.files[f"{name}.vm"] = text.rstrip("\n").encode() + b"\n"
        return name, self.out

    def run_strategy(self, strategy: str) -> None:
        restart = {v: k[0] for k, v in RUN_STRATEGIES.items()}.get(strategy)
        if restart is None:
            if strategy not in ("Manual", "Halted"):
                self.out.notes.append(f"runStrategy {strategy}: not expressible; the VM is "
                                      "not enabled")
            return
        if restart != "on-failure":
            self.set("Restart", restart, "Service")
        self.set("WantedBy", DEFAULT_TARGET, "Install")

    def domain(self, domain: dict[str, Any]) -> None:
        cpu = domain.get("cpu") or {}
        count = 1
        for key in ("sockets", "cores", "threads"):
            count *= int(_take(cpu, key) or 1)
        if count != 1:
            self.set("CPUs", str(count))
        model = _take(cpu, "model")
        if model:
            self.set("CPUModel", model)
        memory = _take(domain, "memory", "guest")
        if memory is None:
            memory = _take(domain, "resources", "requests", "memory")
        if memory is not None:
            size = parse_quantity(memory)
            if size is None:
                self.out.notes.append(f"memory {memory}: not a whole number of bytes")
            elif size != settings.default_value("Memory"):
                self.set("Memory", _size_text(size))
        machine = _take(domain, "machine", "type")
        if machine and machine != "q35":
            self.set("Machine", machine)
        firmware = domain.get("firmware") or {}
        uuid = _take(firmware, "uuid")
        if uuid:
            self.set("UUID", uuid)
        loader = firmware.get("bootloader") or {}
        if "efi" in loader:
            efi = loader["efi"] or {}
            if _take(efi, "secureBoot") is not False:
                self.out.notes.append("firmware.bootloader.efi: Secure Boot (KubeVirt's "
                                      "default) is not expressible; UEFI without it")
            _take(efi, "persistent")
            _take(loader, "efi")
            self.set("Firmware", Firmware.UEFI.value)
        _take(loader, "bios")
        devices = domain.get("devices") or {}
        if _take(devices, "autoattachSerialConsole") is False:
            self.set("Console", ConsoleMode.NONE.value)

    def volume(self, volume: dict[str, Any], disks: dict[str, dict[str, Any]],
               templates: dict[str, Any], image_path: str | None, name: str) -> bool:
        """One volume and its disk; True for the cloud-init seed."""
        vname = volume.pop("name", None)
        disk = disks.get(vname) or {}
        _take(disk, "name")
        _take(disk, "bootOrder")
        if "cloudInitNoCloud" in volume:
            self.nocloud = volume.pop("cloudInitNoCloud") or {}
            _take(disk, "disk", "bus")
            self.leftover(volume, f"volume {vname}")
            return True
        if "containerDisk" in volume or "dataVolume" in volume:
            self.image(volume, disk, templates, image_path)
        elif "hostDisk" in volume:
            self.host_disk(volume, disk)
        elif "secret" in volume:
            self.credentials(volume, disk)
        self.leftover(volume, f"volume {vname}")
        return False

    def leftover(self, d: dict[str, Any], what: str) -> None:
        self.out.notes += _Leftovers(d, what).names()

    def image(self, volume: dict[str, Any], disk: dict[str, Any],
              templates: dict[str, Any], image_path: str | None) -> None:
        if image_path is None:
            self.out.notes.append("a containerDisk or DataVolume without the "
                                  f"{IMAGE_ANNOTATION} annotation: give the image's local "
                                  "path as Image=")
            return
        self.set("Image", image_path)
        _take(disk, "disk", "bus")
        if "containerDisk" in volume:
            _take(volume, "containerDisk", "image")
            self.set("Ephemeral", "yes")
            return
        template = templates.pop(_take(volume, "dataVolume", "name"), None) or {}
        _take(template, "metadata", "name")
        _take(template, "spec", "source", "registry", "url")
        storage = (template.get("spec") or {}).get("storage") or {}
        _take(storage, "accessModes")
        size = parse_quantity(_take(storage, "resources", "requests", "storage") or "")
        if size is not None and size != _image_size(Path(image_path)):
            self.set("DiskSize", str(size))
        self.leftover(template, "dataVolumeTemplate")

    def host_disk(self, volume: dict[str, Any], disk: dict[str, Any]) -> None:
        host = volume.get("hostDisk") or {}
        path = _take(host, "path")
        if _take(host, "type") not in ("Disk", None) or not path:
            return
        if "cdrom" in disk:
            _take(disk, "cdrom", "bus")
            _take(disk, "cdrom", "readonly")
            self.set("CDROM", path)
            return
        options = [path.replace(",", ",,"), "format=raw"]
        bus = _take(disk, "disk", "bus") or "virtio"
        if bus != "virtio":
            options.append(f"bus={bus}")
        if _take(disk, "disk", "readonly"):
            options.append("readonly")
        cache = _take(disk, "cache")
        if cache:
            options.append(f"cache={cache}")
        self.set("Disk", ",".join(options))

    def credentials(self, volume: dict[str, Any], disk: dict[str, Any]) -> None:
        secret = self.secrets.pop(_take(volume, "secret", "secretName") or "", None)
        if secret is None:
            self.out.notes.append("a secret volume whose Secret is not in the file")
            return
        _take(disk, "disk", "bus")
        for key, value in _secret_values(secret).items():
            self.set("SetCredential", f"{key}:{value}")

    def seed(self, vmi: dict[str, Any], name: str, hostname: str | None, seeded: bool) -> None:
        nocloud = self.nocloud
        wrote = False
        for key, suffix, setting in (("userData", "user-data", "UserData"),
                                     ("networkData", "network-config", "NetworkConfig")):
            data: bytes | None = None
            text = _take(nocloud, key)
            encoded = _take(nocloud, f"{key}Base64")
            if text is not None:
                data = text.encode()
            elif encoded is not None:
                data = base64.b64decode(encoded)
            if data is None or (setting == "UserData" and data == _empty_user_data()):
                continue
            filename = f"{name}.{suffix}"
            self.out.files[filename] = data
            self.set(setting, str(self.directory / filename))
            wrote = True
        self.leftover(nocloud, "cloudInitNoCloud")
        for credential in _take(vmi, "accessCredentials", default=[]) or []:
            ssh_key = credential.get("sshPublicKey") or {}
            secret = self.secrets.pop(_take(ssh_key, "source", "secret", "secretName") or "",
                                      None)
            if secret is None or _take(ssh_key, "propagationMethod", "noCloud") is None:
                self.out.notes.append("accessCredentials: only SSH keys from a Secret in the "
                                      "file, by noCloud, are expressible")
                continue
            _take(credential, "sshPublicKey", "propagationMethod")
            _take(credential, "sshPublicKey", "source")
            for value in _secret_values(secret).values():
                for line in value.splitlines():
                    if line.strip():
                        self.set("SSHAuthorizedKey", line.strip())
                        wrote = True
        # KubeVirt's default host name is the VirtualMachine's name.
        given = hostname or k8s_name(name)
        if given != settings.name_label(name) or not wrote:
            self.set("Hostname", given)

    def interfaces(self, vmi: dict[str, Any], devices: dict[str, Any]) -> None:
        networks = _take(vmi, "networks", default=[]) or []
        interfaces = _take(devices, "interfaces", default=[]) or []
        attach = _take(devices, "autoattachPodInterface")
        pods = {n.get("name") for n in networks if "pod" in n}
        for net in networks:
            if "pod" not in net:
                self.out.notes.append(f"network {net.get('name')}: only the pod network is "
                                      "expressible (Network=user)")
        if not interfaces:
            # Without interfaces KubeVirt adds one on the pod network unless told not to.
            if attach is False:
                self.set("Network", "none")
            return
        for iface in interfaces:
            if iface.get("name") not in pods or "masquerade" not in iface:
                self.out.notes.append(f"interface {iface.get('name')}: only masquerade on the "
                                      "pod network is expressible (Network=user)")
                continue
            for key in ("name", "masquerade", "model", "ports"):
                iface.pop(key, None)
            self.set("Network", "user")
            mac = iface.pop("macAddress", None)
            if mac:
                self.set("MAC", mac)
            self.leftover(iface, "interface")

    def service(self, service: dict[str, Any], kname: str) -> None:
        doc = _Leftovers(service, f"Service {service.get('metadata', {}).get('name')}")
        svc = doc.doc
        for key in ("apiVersion", "kind", "status"):
            svc.pop(key, None)
        meta = svc.get("metadata") or {}
        _take(meta, "name")
        host_ip = _take(meta, "annotations", HOST_IP_ANNOTATION) or ""
        spec = svc.get("spec") or {}
        if _take(spec, "selector") != {VM_LABEL: kname}:
            self.out.notes.append(f"Service {service['metadata'].get('name')}: does not "
                                  "select this VM")
            return
        if _take(spec, "type") not in (None, "ClusterIP"):
            self.out.notes.append(f"Service {service['metadata'].get('name')}: only a "
                                  "ClusterIP Service is a published port")
        for port in _take(spec, "ports", default=[]) or []:
            protocol = str(port.pop("protocol", "TCP")).lower()
            host_port, target = port.pop("port", None), port.pop("targetPort", None)
            port.pop("name", None)
            target = target if target is not None else host_port
            prefix = f"{host_ip}:" if host_ip else ""
            self.set("PublishPort", f"{prefix}{host_port}:{target}/{protocol}")
            self.leftover(port, "Service port")
        self.out.notes += doc.names()


def _empty_user_data() -> bytes:
    from qemu_unit.vm.seed import EMPTY_USER_DATA

    return EMPTY_USER_DATA


def _boot_order(disk: dict[str, Any]) -> int:
    order = disk.get("bootOrder")
    return order if isinstance(order, int) else 1 << 30


def _secret_values(secret: dict[str, Any]) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return values | dict(secret.get("stringData") or {})


def _size_text(size: int) -> str:
    for suffix, power in (("T", 4), ("G", 3), ("M", 2)):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{suffix}"
    return str(size)


def play(documents: Iterable[Any], directory: Path) -> tuple[str, Conversion]:
    """The .vm (and seed files) for the VirtualMachine in DOCUMENTS, as files named
    relative to DIRECTORY (where the .vm will name them), and what it cannot say."""
    return _Player(documents, directory).run()
