"""The .vm language: one table of keys (SETTINGS) and the typed VMConfig it builds.

Each row of SETTINGS drives parsing, the default, validation, error messages
and the key reference in qemu-run.vm(5). Import-light, because the generator
imports this at every boot: stdlib, errors, unitfile, source, names; never
libvirt.

Semantics are systemd's: a repeated list key appends, an empty assignment
resets a list (or a single-valued key to its default), for a repeated
single-valued key the last assignment wins.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from qemu_unit.config.imagesource import ImageSource, is_url, parse_checksum
from qemu_unit.config.names import split_template
from qemu_unit.config.source import Source
from qemu_unit.config.unitfile import Entry, UnitFile, read
from qemu_unit.errors import ConfigError
from qemu_unit.records import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VM_SECTION = "VM"
# Sections handed to the generator untouched.
PASSTHROUGH_SECTIONS = ("Unit", "Service", "Install")
# Sections and [VM] keys starting with this are extensions for other tools:
# ignored, as systemd ignores X- sections and keys (the generator drops X- sections).
EXTENSION_PREFIX = "X-"

# Stable per-VM defaults (UUID, MAC) are derived from the name: the UUID in the
# namespace uuid5(NAMESPACE_URL, UUID_NAMESPACE_URL).
UUID_NAMESPACE_URL = "https://github.com/qemu-unit/qemu-unit"
MAC_PREFIX = "52:54:00"  # QEMU/KVM's locally administered OUI.


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    @property
    def domain_type(self) -> str:
        """libvirt's <domain type=> for a decided accelerator."""
        return "kvm" if self is Accel.KVM else "qemu"

    @classmethod
    def for_domain_type(cls, domain_type: str | None) -> Accel:
        """The accelerator a <domain type=> asks for."""
        return cls.KVM if domain_type == "kvm" else cls.TCG


class Firmware(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class ConsoleMode(StrEnum):
    JOURNAL = "journal"
    NONE = "none"


class ShutdownMethod(StrEnum):
    ACPI = "acpi"
    AGENT = "agent"


class HostShutdown(StrEnum):
    SHUTDOWN = "shutdown"
    SAVE = "save"


class NetworkKind(StrEnum):
    USER = "user"
    TAP = "tap"
    BRIDGE = "bridge"

    @property
    def interface_type(self) -> str:
        """libvirt's <interface type=> for this kind."""
        return _INTERFACE_TYPES[self]

    @classmethod
    def for_interface(cls, interface_type: str) -> NetworkKind:
        """The kind with the same needs on the host as libvirt's <interface type=>; types
        without a kind of their own (network, direct...) get the widest: bridge."""
        return _INTERFACE_KINDS.get(interface_type, cls.BRIDGE)


_INTERFACE_TYPES = {NetworkKind.USER: "user", NetworkKind.TAP: "ethernet",
                    NetworkKind.BRIDGE: "bridge"}  # fmt: skip
_INTERFACE_KINDS = {t: k for k, t in _INTERFACE_TYPES.items()}


class AutoUpdate(StrEnum):
    NO = "no"
    YES = "yes"
    RESET = "reset"


class ReadyKind(StrEnum):
    STARTED = "started"
    CONSOLE = "console"
    AGENT = "agent"
    HEALTHY = "healthy"


class HealthAction(StrEnum):
    """HealthOnFailure=: what an unhealthy VM gets (Quadlet's names)."""

    NONE = "none"
    KILL = "kill"
    RESTART = "restart"
    STOP = "stop"


# The records below are NamedTuples, not dataclasses: this module is imported at every boot
# (the generator) and VM start, and a NamedTuple is made in ~0.15 ms against a frozen
# dataclass's ~0.5 ms (which also imports inspect): ~15 ms of each start (README, Benchmarks).
#
# A parsed value keeps the assignment that made it (entry) for messages only: two values
# are equal, hash and print alike whatever line set them, and a secret never prints. These
# four methods say so for the records with an entry (NamedTuple allows no shared base, and
# mypy no assignment in its body: they are set below the records, see _VALUES).
def _compared(self: Any) -> tuple[Any, ...]:
    return tuple(v for f, v in zip(self._fields, self, strict=True) if f != "entry")


def _value_eq(self: Any, other: object) -> bool:
    # Never equal to a plain tuple, as a dataclass was not.
    return other.__class__ is self.__class__ and bool(_compared(self) == _compared(other))


def _value_ne(self: Any, other: object) -> bool:
    return not _value_eq(self, other)


def _value_hash(self: Any) -> int:
    return hash(_compared(self))


def _value_repr(self: Any) -> str:
    unshown = ("entry", "value") if isinstance(self, Credential) else ("entry",)
    shown = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self, strict=True)
                      if f not in unshown)
    return f"{self.__class__.__qualname__}({shown})"


class Ready(NamedTuple):
    """Ready=: when the unit reports READY=1."""

    kind: ReadyKind
    regex: str | None = None  # for console:REGEX

    def __str__(self) -> str:
        return f"console:{self.regex}" if self.kind is ReadyKind.CONSOLE else self.kind.value


class PublishedPort(NamedTuple):
    """A PublishPort= assignment: HOST_IP:HOST_PORT on the host -> GUEST_PORT in the guest."""

    host_ip: str  # "": every address of the host, as Podman does
    host_port: int
    guest_port: int
    protocol: str = "tcp"
    entry: Entry | None = None

    def hostfwd(self) -> str:
        """QEMU user networking's hostfwd= value."""
        return f"{self.protocol}:{self.host_ip}:{self.host_port}-:{self.guest_port}"


class Credential(NamedTuple):
    """A systemd credential for the guest: SetCredential= or LoadCredential=."""

    id: str
    # SetCredential='s value. Never in a repr: a traceback or log line must not show it.
    value: str | None = None
    # LoadCredential='s file; None (and no value): $CREDENTIALS_DIRECTORY/ID of the unit.
    path: Path | None = None
    entry: Entry | None = None


DISK_FORMATS = ("raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "vhdx")
DISK_BUSES = ("virtio", "sata", "scsi", "ide")
DISK_CACHES = ("default", "none", "writeback", "writethrough", "directsync", "unsafe")


class Disk(NamedTuple):
    """A Disk= assignment."""

    path: Path
    # None: not given; read from the file's magic when the domain is rendered.
    format: str | None = None
    readonly: bool = False
    bus: str = "virtio"
    cache: str | None = None
    entry: Entry | None = None


# virtio-fs tags are at most 36 bytes (the device's config space).
SHARE_TAG_MAX = 36
_SHARE_TAG = r"[A-Za-z0-9_.-]+"


class Share(NamedTuple):
    """A Share= assignment: host directory PATH as virtio-fs TAG in the guest."""

    path: Path
    tag: str
    readonly: bool = False
    entry: Entry | None = None
    mount: str | None = None  # ShareMount=: where a cloud-init guest mounts it

    @property
    def mount_point(self) -> str:
        """Where a guest with a cloud-init seed mounts the share."""
        return self.mount or f"/mnt/{self.tag}"


# The records whose entry is not part of their value (_value_eq).
_VALUES = (PublishedPort, Credential, Disk, Share)
for _record in _VALUES:
    _record.__eq__ = _value_eq  # type: ignore[method-assign]
    _record.__ne__ = _value_ne  # type: ignore[method-assign]
    _record.__hash__ = _value_hash  # type: ignore[method-assign]
    _record.__repr__ = _value_repr  # type: ignore[method-assign]


class Network(NamedTuple):
    """One network interface: a Network= assignment and its MAC address."""

    kind: NetworkKind
    target: str | None  # the tap interface or the bridge; None for user
    mac: str = ""  # empty: derived from the VM's name, see VMConfig.macs()


class FileRef(NamedTuple):
    """A file the VM needs, and the assignment that named it (None: the source itself)."""

    path: Path
    entry: Entry | None
    writable: bool = False  # the guest writes it (a disk not read-only)


class VMConfig(NamedTuple):
    """A VM as its .vm file (or NAME.xml) and drop-ins describe it, defaults filled in."""

    # The fields set by keys carry no default here: SETTINGS holds each default once,
    # and parse_vm() builds every VMConfig from the table (see Setting.field).
    name: str
    source_path: Path
    memory: int  # bytes
    cpus: int
    machine: str
    accel: Accel
    cpu_model: str | None  # None: host-passthrough under KVM, QEMU's default under TCG
    firmware: Firmware
    kernel: Path | None
    initrd: Path | None
    kernel_cmdline: str | None
    disks: tuple[Disk, ...]
    cdroms: tuple[Path, ...]
    networks: tuple[Network, ...]
    uuid: str | None  # None: derived from the name, see domain_uuid()
    console: ConsoleMode
    console_log: int  # bytes per file of the console's copy; 0: none
    console_rate_interval: float  # seconds; 0: no limit
    console_rate_burst: int  # lines per interval; 0: no limit
    shutdown_mode: tuple[ShutdownMethod, ...]
    shutdown_timeout: float  # seconds
    host_shutdown: HostShutdown
    snapshot_schedule: str | None  # an OnCalendar= expression
    snapshot_keep: int  # scheduled snapshots kept; 0: all
    backup_schedule: str | None  # an OnCalendar= expression
    backup_to: Path | None  # the backup directory of scheduled backups
    backup_keep: int  # scheduled backups: the points the last N need are kept; 0: all
    ready: Ready
    health_cmd: str | None  # run in the guest by its agent; None: no health check
    health_interval: float  # seconds
    health_timeout: float  # seconds
    health_retries: int
    health_start_period: float  # seconds
    health_on_failure: HealthAction
    image: Path | None  # a local base image; None for a URL (see image_source)
    image_source: ImageSource | None  # Image= as a URL, with what verifies it
    auto_update: AutoUpdate
    ephemeral: bool
    disk_size: int | None  # bytes; None: the base image's size
    user_data: Path | None
    ssh_authorized_keys: tuple[str | Path, ...]  # a key, or a file of keys
    hostname: str | None  # None: derived from the name, see guest_hostname()
    network_config: Path | None
    credentials: tuple[Credential, ...]
    publish_ports: tuple[PublishedPort, ...]
    restrict_network: bool
    allow_host_loopback: bool
    secure_boot: bool
    tpm: bool
    shares: tuple[Share, ...]
    domain_xml: Path | None
    dropins: tuple[Path, ...] = ()
    unit: tuple[Entry, ...] = ()
    service: tuple[Entry, ...] = ()
    install: tuple[Entry, ...] = ()
    # Every file named by the configuration, for host.check_files().
    files: tuple[FileRef, ...] = ()
    # The assignments that set the [VM] keys, for messages about them (see origin()).
    origins: tuple[Entry, ...] = ()

    # The derived defaults are computed where the domain is rendered, not while parsing:
    # the generator parses every VM at boot and needs neither (uuid and hashlib imports).
    def domain_uuid(self) -> str:
        """UUID=, else a stable UUID derived from the name."""
        return self.uuid or stable_uuid(self.name)

    def macs(self) -> tuple[str, ...]:
        """Each interface's MAC=, else a stable MAC derived from the name and its index."""
        return tuple(n.mac or stable_mac(self.name, i) for i, n in enumerate(self.networks))

    def guest_hostname(self) -> str:
        """Hostname=, else the VM name made a valid host name (a-z, 0-9, '-')."""
        return self.hostname or name_label(self.name)

    @property
    def has_seed(self) -> bool:
        """Whether the guest gets a cloud-init NoCloud seed."""
        return bool(self.user_data or self.ssh_authorized_keys or self.hostname
                    or self.network_config)

    def origin(self, key: str) -> Entry | None:
        """The last assignment of [VM] KEY still in effect, None when KEY is at its default."""
        found = [e for e in self.origins if e.key == key]
        return found[-1] if found else None

    @property
    def wanted_by(self) -> tuple[str, ...]:
        return _install_list(self.install, "WantedBy")

    @property
    def required_by(self) -> tuple[str, ...]:
        return _install_list(self.install, "RequiredBy")


def name_label(name: str) -> str:
    """NAME as one DNS label (a-z, 0-9, '-'; at most 63): a host name, a Kubernetes name."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "vm"


def default_value(key: str) -> Any:
    """Single-valued KEY's default, parsed (None: none, or derived)."""
    return _defaults()[key]


def _install_list(entries: tuple[Entry, ...], key: str) -> tuple[str, ...]:
    """A whitespace-separated [Install] list: assignments append, an empty one resets."""
    out: list[str] = []
    for e in entries:
        if e.key != key:
            continue
        if not e.value:
            out.clear()
        out.extend(w for w in e.value.split() if w not in out)
    return tuple(out)


# Parsers: (value, entry) -> typed value. The entry is only for messages.


def _fail(entry: Entry, message: str) -> ConfigError:
    return ConfigError(message, entry=entry)


_SIZE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,20})?|\.[0-9]{1,20})\s*([KMGTPEB]?)")
_SIZE_FACTORS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_FACTORS |= {"P": 1024**5, "E": 1024**6}


def parse_size(value: str, entry: Entry) -> int:
    """A size in bytes as systemd reads one: '512M', '1.5G', '1073741824' (base 1024)."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise _fail(entry, f"invalid size {value!r}: expected a number with K, M, G or T")
    # Exact, rounded down: '1.5' is 15 / 10 (no float, no fractions import at boot).
    whole, _, decimals = match.group(1).partition(".")
    size: int = int(whole + decimals) * _SIZE_FACTORS[match.group(2)] // 10 ** len(decimals)
    if not 1024**2 <= size <= 1024**5:
        raise _fail(entry, f"invalid size {value!r}: expected from 1M to 1P")
    return size


def parse_cpus(value: str, entry: Entry) -> int:
    if not (0 < len(value) <= 4 and value.isascii() and value.isdigit()) or not (
        1 <= int(value) <= 1024
    ):
        raise _fail(entry, f"invalid CPU count {value!r}: expected a number from 1 to 1024")
    return int(value)


# Patterns of rarely used keys stay strings: re compiles (and caches) them on
# first use instead of at every boot.
_MACHINE = r"[a-z][a-z0-9._-]*"


def is_q35(machine: str) -> bool:
    """Whether MACHINE is a Q35 type (no IDE; CD-ROMs go on SATA)."""
    return machine == "q35" or machine.startswith("pc-q35")


def parse_machine(value: str, entry: Entry) -> str:
    if not re.fullmatch(_MACHINE, value):
        raise _fail(entry, f"invalid machine type {value!r}: expected e.g. q35 or pc")
    return value


def _enum_parser(enum: type[StrEnum]) -> Callable[[str, Entry], Any]:
    def parse(value: str, entry: Entry) -> Any:
        try:
            return enum(value)
        except ValueError:
            choices = "|".join(enum)
            raise _fail(entry, f"invalid value {value!r}: expected {choices}") from None

    return parse


_CPU_MODEL = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def parse_cpu_model(value: str, entry: Entry) -> str:
    if not re.fullmatch(_CPU_MODEL, value):
        raise _fail(entry, f"invalid CPU model {value!r}")
    return value


def parse_path(value: str, entry: Entry) -> Path:
    if not value.startswith("/"):
        raise _fail(entry, f"path {value!r} is not absolute")
    return Path(value)


def parse_url(value: str, entry: Entry) -> str:
    if not is_url(value) or any(c.isspace() for c in value):
        raise _fail(entry, f"{value!r} is not an https://, http:// or file:// URL")
    return value


def parse_image(value: str, entry: Entry) -> Path | str:
    """An absolute path, or an https://, http:// or file:// URL (pulled into the cache)."""
    return parse_url(value, entry) if "://" in value else parse_path(value, entry)


def parse_image_checksum(value: str, entry: Entry) -> str:
    try:
        parse_checksum(value)
    except ValueError as e:
        raise _fail(entry, str(e)) from None
    return value.lower()


def parse_cmdline(value: str, entry: Entry) -> str:
    return value


def _split_options(value: str) -> list[str]:
    """Split on ',' where ',,' is a literal comma, as QEMU's -drive does."""
    if "," not in value:
        return [value]
    parts = [""]
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                parts[-1] += ","
                i += 2
                continue
            parts.append("")
        else:
            parts[-1] += value[i]
        i += 1
    return parts


_DISK_OPTIONS = {"format": DISK_FORMATS, "bus": DISK_BUSES, "cache": DISK_CACHES}


def parse_disk(value: str, entry: Entry) -> Disk:
    path, *options = _split_options(value)
    disk_path = parse_path(path, entry)
    opts: dict[str, Any] = {}
    allowed = _DISK_OPTIONS
    for option in options:
        name, eq, arg = option.partition("=")
        if name == "readonly" and not eq:
            opts["readonly"] = True
        elif name in allowed and eq:
            if arg not in allowed[name]:
                choices = "|".join(allowed[name])
                raise _fail(entry, f"invalid {name} {arg!r}: expected {choices}")
            opts[name] = arg
        else:
            raise _fail(
                entry,
                f"unknown disk option {option!r}: expected format=, bus=, cache= or readonly",
            )
    disk = Disk(disk_path, entry=entry, **opts)
    if disk.readonly and disk.bus in ("sata", "ide"):
        # libvirt: "readonly sata disks are not supported" (the same for IDE).
        raise _fail(entry, f"readonly needs bus=virtio or bus=scsi, not bus={disk.bus}")
    return disk


_IFNAME = r"[A-Za-z0-9_.-]{1,15}"


def parse_network(value: str, entry: Entry) -> tuple[NetworkKind, str | None] | None:
    """'none' -> None; 'user' | 'tap:IFACE' | 'bridge:BRIDGE' -> (kind, target)."""
    kind, colon, target = value.partition(":")
    if value == "none":
        return None
    if value == "user":
        return NetworkKind.USER, None
    if kind in ("tap", "bridge") and colon:
        if not re.fullmatch(_IFNAME, target) or target in (".", ".."):
            raise _fail(entry, f"invalid interface name {target!r} (at most 15 of A-Za-z0-9_.-)")
        return NetworkKind(kind), target
    raise _fail(entry, f"invalid network {value!r}: expected none, user, tap:IFACE or bridge:NAME")


_MAC = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"


def parse_mac(value: str, entry: Entry) -> str:
    mac = value.lower()
    if not re.fullmatch(_MAC, mac):
        raise _fail(entry, f"invalid MAC address {value!r}: expected e.g. 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise _fail(entry, f"MAC address {value!r} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise _fail(entry, "MAC address 00:00:00:00:00:00 is not usable")
    return mac


def parse_uuid(value: str, entry: Entry) -> str:
    try:
        import uuid

        return str(uuid.UUID(value))
    except ValueError:
        raise _fail(entry, f"invalid UUID {value!r}") from None


def parse_shutdown_mode(value: str, entry: Entry) -> tuple[ShutdownMethod, ...]:
    parse = _enum_parser(ShutdownMethod)
    methods = tuple(parse(word, entry) for word in value.split())
    if len(set(methods)) != len(methods):
        raise _fail(entry, f"{value!r} names a method twice")
    return methods


_TIME_UNITS: dict[str, float] = {}
for _factor, _names in (
    (1e-6, "usec us µs"),
    (1e-3, "msec ms"),
    (1.0, "seconds second sec s"),
    (60.0, "minutes minute min m"),
    (3600.0, "hours hour hr h"),
    (86400.0, "days day d"),
    (604800.0, "weeks week w"),
    (2629800.0, "months month M"),
    (31557600.0, "years year y"),
):
    _TIME_UNITS |= dict.fromkeys(_names.split(), _factor)
_TIME_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Zµ]*)")


def parse_timespan(value: str, entry: Entry) -> float:
    """A systemd time span in seconds: '90s', '2min', '1min 30s', '90' (seconds)."""
    text = value.strip()
    total, pos = 0.0, 0
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if not match or match.group(2) not in _TIME_UNITS and match.group(2):
            raise _fail(entry, f"invalid time span {value!r}: expected e.g. 90s, 2min, 1min 30s")
        total += float(match.group(1)) * _TIME_UNITS.get(match.group(2), 1.0)
        pos = match.end()
    if pos == 0 or not math.isfinite(total):
        raise _fail(entry, f"invalid time span {value!r}: expected e.g. 90s, 2min, 1min 30s")
    return total


def parse_console_log(value: str, entry: Entry) -> int:
    """'no' or '0' -> 0 (no file), else a size as parse_size() reads it."""
    return 0 if value in ("no", "0") else parse_size(value, entry)


def parse_calendar(value: str, entry: Entry) -> str:
    """An OnCalendar= expression: systemd checks its grammar when it loads the timer."""
    if not value.strip() or not value.isprintable():
        raise _fail(entry, f"invalid calendar expression {value!r}")
    return value.strip()


def parse_count(value: str, entry: Entry) -> int:
    if not (0 < len(value) <= 9 and value.isascii() and value.isdigit()):
        raise _fail(entry, f"invalid number {value!r}: expected 0 to 999999999")
    return int(value)


def parse_ready(value: str, entry: Entry) -> Ready:
    if value in ("started", "agent", "healthy"):
        return Ready(ReadyKind(value))
    kind, colon, regex = value.partition(":")
    if kind != "console" or not colon:
        raise _fail(entry, f"invalid value {value!r}: expected started, agent, healthy or "
                    "console:REGEX")
    if not regex:
        raise _fail(entry, "console: needs a regular expression")
    try:
        re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        raise _fail(entry, f"invalid regular expression {regex!r}: {e}") from None
    return Ready(ReadyKind.CONSOLE, regex)


_BOOLEANS = {"1": True, "yes": True, "y": True, "true": True, "t": True, "on": True,
             "0": False, "no": False, "n": False, "false": False, "f": False, "off": False}


def parse_bool(value: str, entry: Entry) -> bool:
    """A boolean as systemd reads one (yes/no, true/false, on/off, 1/0)."""
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise _fail(entry, f"invalid boolean {value!r}: expected yes or no") from None


def parse_disk_size(value: str, entry: Entry) -> int:
    size = parse_size(value, entry)
    if size % 512:
        raise _fail(entry, f"invalid size {value!r}: not a multiple of 512 bytes")
    return size


# A label of a host name (RFC 1123); the whole name at most 253 characters.
_HOST_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"


def parse_hostname(value: str, entry: Entry) -> str:
    name = value.lower()
    if len(name) > 253 or not all(re.fullmatch(_HOST_LABEL, p) for p in name.split(".")):
        raise _fail(entry, f"invalid host name {value!r}: expected labels of a-z, 0-9 and '-' "
                           "separated by '.'")
    return name


# An OpenSSH public key line: [options] TYPE BASE64 [comment]; options are not for us.
_SSH_KEY = r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)|sk-\S+)\s+[A-Za-z0-9+/]+=*(\s.*)?"


def parse_ssh_key(value: str, entry: Entry) -> str | Path:
    """An OpenSSH public key as in authorized_keys, or the absolute path of a file of them."""
    if value.startswith("/"):
        return Path(value)
    if not re.fullmatch(_SSH_KEY, value):
        raise _fail(entry, f"invalid SSH public key {value[:40]!r}: expected e.g. "
                           "'ssh-ed25519 AAAA... comment' or an absolute path to a file of keys")
    return value


# systemd's credential names are file names; fw_cfg names hold at most 55 bytes, 27 of
# them 'opt/io.systemd.credentials/'.
CREDENTIAL_ID_MAX = 28
# Keys whose values are secrets: never in a message (journal, kmsg, STATUS=).
SECRET_KEYS = frozenset({"SetCredential"})
_CREDENTIAL_ID = r"[A-Za-z0-9_.@-]+"


def _credential_id(cred_id: str, entry: Entry) -> str:
    # The name is not shown: a line written without its ID puts the secret in its place.
    if not re.fullmatch(_CREDENTIAL_ID, cred_id) or cred_id in (".", ".."):
        raise _fail(entry, f"invalid credential name ({len(cred_id)} characters before the "
                           "first ':'): expected ID:VALUE, ID of A-Z a-z 0-9 _ . @ -")
    if len(cred_id) > CREDENTIAL_ID_MAX:
        raise _fail(entry, f"credential name longer than {CREDENTIAL_ID_MAX} characters "
                           "(QEMU's fw_cfg names are short)")
    return cred_id


def parse_set_credential(value: str, entry: Entry) -> Credential:
    cred_id, colon, secret = value.partition(":")
    if not colon:
        raise _fail(entry, "expected ID:VALUE")
    return Credential(_credential_id(cred_id, entry), value=secret, entry=entry)


def parse_load_credential(value: str, entry: Entry) -> Credential:
    cred_id, colon, path = value.partition(":")
    _credential_id(cred_id, entry)
    if not colon:
        return Credential(cred_id, entry=entry)
    return Credential(cred_id, path=parse_path(path, entry), entry=entry)


def _port(text: str, what: str, entry: Entry) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise _fail(entry, f"invalid {what} {text!r}: expected a number from 1 to 65535")
    return int(text)


def parse_publish_port(value: str, entry: Entry) -> PublishedPort:
    """[[IP:]HOSTPORT:]GUESTPORT[/tcp|/udp], as podman run --publish (no ranges)."""
    spec, slash, protocol = value.partition("/")
    if slash and protocol not in ("tcp", "udp"):
        raise _fail(entry, f"invalid protocol {protocol!r}: expected tcp or udp")
    if spec.startswith("["):
        raise _fail(entry, "IPv6 addresses are not supported: QEMU's user network forwards "
                           "from IPv4 addresses")
    parts = spec.split(":")
    if len(parts) == 1:
        raise _fail(entry, f"{value!r} gives no host port: expected [[IP:]HOSTPORT:]GUESTPORT")
    if len(parts) > 3 or any("-" in p for p in parts[-2:]):
        raise _fail(entry, f"invalid port mapping {value!r}: expected [[IP:]HOSTPORT:]GUESTPORT "
                           "(one port each, no ranges)")
    host_ip = parts[0] if len(parts) == 3 else ""
    if host_ip:
        import ipaddress  # only for this key: the generator would pay for it at every boot

        try:
            host_ip = str(ipaddress.IPv4Address(host_ip))
        except ValueError:
            raise _fail(entry, f"invalid IPv4 address {host_ip!r}") from None
    return PublishedPort(host_ip, _port(parts[-2], "host port", entry),
                         _port(parts[-1], "guest port", entry), protocol or "tcp", entry)


class Setting(NamedTuple):
    """One key of a .vm file.

    DEFAULT is written as in a .vm file and parsed like any value (None: the
    default is derived, HELP says how). HELP is the man page paragraph.
    """

    name: str
    field: str  # the VMConfig attribute it sets
    parse: Callable[[str, Entry], Any]
    default: str | None
    metavar: str
    help: str  # only what the other columns cannot say (the man page adds what they say)
    repeatable: bool = False
    choices: tuple[str, ...] = ()
    specifiers: bool = False  # %i, %n, %p, %% are expanded
    with_domain_xml: bool = False  # allowed next to DomainXML=
    # Combination rules, as data: the key this one needs assigned, and a check of each
    # value against the settled single-valued keys (a message, or None when fine).
    requires: str | None = None
    check: Callable[[Any, dict[str, Any]], str | None] | None = None
    # The field's value from the assignments, when it is not the value or the list of
    # values (several rows may share a field: the first row's collect builds it).
    collect: Callable[[_Assignments], Any] | None = None
    # The host file a value names (host.check_files checks them, the generator opens
    # them in the unit's sandbox), and whether the guest may write it.
    names_file: Callable[[Any], Path | None] | None = None
    writes_file: Callable[[Any], bool] | None = None


# The models that are the host's CPU: they need KVM. The first is the default under KVM.
HOST_CPU_MODELS = ("host-passthrough", "host-model")


def _check_cpu_model(model: str | None, settled: dict[str, Any]) -> str | None:
    if settled["Accel"] is Accel.TCG and model in HOST_CPU_MODELS:
        return f"{model} needs KVM, but Accel=tcg"
    return None


def _check_ready(ready: Ready, settled: dict[str, Any]) -> str | None:
    if ready.kind is ReadyKind.CONSOLE and settled["Console"] is ConsoleMode.NONE:
        return "console:REGEX needs Console=journal"
    if ready.kind is ReadyKind.HEALTHY and not settled.get("HealthCmd"):
        return "healthy needs HealthCmd="
    return None


def parse_health_cmd(value: str, entry: Entry) -> str | None:
    """A shell command line for the guest; "none" (Quadlet's word) or empty: no check."""
    if "\0" in value:
        raise _fail(entry, "a command line cannot contain NUL")
    return None if value in ("", "none") else value


def parse_health_retries(value: str, entry: Entry) -> int:
    retries = parse_count(value, entry)
    if retries < 1:
        raise _fail(entry, "expected at least 1")
    return retries


def parse_health_interval(value: str, entry: Entry) -> float:
    seconds = parse_timespan(value, entry)
    if seconds < 1:
        raise _fail(entry, f"{value!r} is too short: at least 1s between two checks")
    return seconds


def _check_host_shutdown(value: HostShutdown, settled: dict[str, Any]) -> str | None:
    if value is HostShutdown.SAVE and settled["Ephemeral"]:
        return "save needs a kept disk: Ephemeral=yes makes a new one at every start"
    return None


def _check_disk_bus(disk: Disk, settled: dict[str, Any]) -> str | None:
    if disk.bus == "ide" and is_q35(settled["Machine"]):
        return f"bus=ide is not available on Machine={settled['Machine']}"
    return None


def _same_path(path: Path) -> Path:
    return path


def _check_secure_boot(on: bool, settled: dict[str, Any]) -> str | None:
    if on and settled["Firmware"] is not Firmware.UEFI:
        return "needs Firmware=uefi"
    if on and not is_q35(settled["Machine"]):
        return f"needs a q35 machine (SMM), not Machine={settled['Machine']}"
    return None


def parse_share(value: str, entry: Entry) -> Share:
    """HOSTDIR:TAG[:ro]."""
    path, colon, rest = value.partition(":")
    tag, _, option = rest.partition(":")
    if not colon or not tag:
        raise _fail(entry, f"invalid share {value!r}: expected HOSTDIR:TAG[:ro]")
    if "," in path:
        # virtiofsd's -o source= ends at a comma.
        raise _fail(entry, f"share directory {path!r} contains ','")
    if option not in ("", "ro", "rw"):
        raise _fail(entry, f"unknown share option {option!r}: expected ro or rw")
    if not re.fullmatch(_SHARE_TAG, tag) or tag in (".", ".."):
        raise _fail(entry, f"invalid share tag {tag!r}: expected A-Z a-z 0-9 _ . -")
    if len(tag) > SHARE_TAG_MAX:
        raise _fail(entry, f"share tag {tag!r} is longer than {SHARE_TAG_MAX} characters")
    return Share(parse_path(path, entry), tag, option == "ro", entry)


# A guest mount point goes into an fstab line and a shell command: nothing to quote.
_MOUNT_PATH = r"(/[A-Za-z0-9_.@+-]+)+"


def parse_share_mount(value: str, entry: Entry) -> tuple[str, str]:
    """TAG:PATH."""
    tag, colon, path = value.partition(":")
    if not colon or not re.fullmatch(_SHARE_TAG, tag):
        raise _fail(entry, f"invalid share mount {value!r}: expected TAG:/PATH")
    if not re.fullmatch(_MOUNT_PATH, path) or any(
            part in (".", "..") for part in path.split("/")):
        raise _fail(entry, f"invalid mount point {path!r}: expected an absolute path of "
                           "A-Z a-z 0-9 _ . @ + - without . or .. components")
    return tag, path


def _shares(a: _Assignments) -> tuple[Share, ...]:
    """Share=, each tag once, with its ShareMount= (each tag and mount point once)."""
    seen: dict[str, Entry] = {}
    for share, entry in a.lists.get("Share", []):
        if share.tag in seen:
            raise _fail(entry, f"share tag {share.tag} is already used (line "
                               f"{seen[share.tag].line})")
        seen[share.tag] = entry
    mounts: dict[str, str] = {}
    points: dict[str, Entry] = {}
    for (tag, path), entry in a.lists.get("ShareMount", []):
        if tag not in seen:
            raise _fail(entry, f"ShareMount= names {tag}, but no Share= has that tag")
        if tag in mounts:
            raise _fail(entry, f"share {tag} already has a mount point ({mounts[tag]})")
        if path in points:
            raise _fail(entry, f"mount point {path} is already used (line "
                               f"{points[path].line})")
        mounts[tag], points[path] = path, entry
    return tuple(share._replace(mount=mounts.get(share.tag)) for share in a.values("Share"))


def _disk_path(disk: Disk) -> Path:
    return disk.path


def _check_auto_update(value: AutoUpdate, settled: dict[str, Any]) -> str | None:
    if value is AutoUpdate.NO:
        return None
    if not isinstance(settled["Image"], str) or settled["ImageChecksums"] is None:
        return "needs an Image= URL with ImageChecksums= (the sums say when a new image is out)"
    if value is AutoUpdate.YES and not settled["Ephemeral"]:
        return "yes needs Ephemeral=yes (a disk that is kept: AutoUpdate=reset discards it)"
    return None


def _local_path(image: Path | str) -> Path | None:
    return image if isinstance(image, Path) else None


def _local_image(a: _Assignments) -> Path | None:
    image = a.single.get("Image", (None, None))[0]
    return image if isinstance(image, Path) else None


def _image_source(a: _Assignments) -> ImageSource | None:
    """Image= as a URL with the keys that verify it; the Image* keys need a URL."""
    image, image_entry = a.single.get("Image", (None, None))
    keys = ("ImageChecksum", "ImageChecksums", "ImageSignature", "ImageKeyring", "ImageVerify")
    values = {k: a.single[k][0] if k in a.single else None for k in keys}
    if not isinstance(image, str):
        for k in keys:
            if k in a.single:
                raise _fail(a.single[k][1], "needs Image= to be a URL")
        return None
    src = ImageSource(image, values["ImageChecksum"], values["ImageChecksums"],
                      values["ImageSignature"], values["ImageKeyring"],
                      values["ImageVerify"] is not False)
    try:
        src.check()
    except ConfigError as e:
        key = e.key or "Image"
        entry = a.single[key][1] if key in a.single else image_entry
        raise ConfigError(e.message, entry=entry, key=key) from None
    return src


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "Memory", "memory", parse_size, "512M", "SIZE",
        "Memory of the guest. A number of bytes, or with one of the suffixes K, M, G, T, P "
        "(base 1024, as systemd reads sizes; case matters); fractions are allowed (1.5G). "
        "From 1M to 1P.",
    ),
    Setting(
        "CPUs", "cpus", parse_cpus, "1", "N",
        "Number of virtual CPUs, from 1 to 1024.",
    ),
    Setting(
        "Machine", "machine", parse_machine, "q35", "TYPE",
        "QEMU machine type: q35 (a PCI Express chipset), pc (the older i440FX chipset), or a "
        "versioned type such as pc-q35-7.2. q35 is what libvirt and virt-install choose for "
        "new x86 guests, it has PCI Express and it is what UEFI Secure Boot needs. IDE disks "
        "(bus=ide) exist only on pc; on q35 CD-ROMs are SATA.",
    ),
    Setting(
        "Accel", "accel", _enum_parser(Accel), "auto", "auto|kvm|tcg",
        "Accelerator. kvm needs a usable /dev/kvm and fails the start otherwise; tcg is "
        "QEMU's portable (slow) emulation; auto uses KVM when the runner finds it usable "
        "when the VM starts and falls back to TCG, saying so in the journal.",
        choices=tuple(Accel),
        with_domain_xml=True,
    ),
    Setting(
        "CPUModel", "cpu_model", parse_cpu_model, None, "MODEL",
        "Guest CPU model: host-passthrough or host-model (both need KVM), max (every "
        "feature the accelerator can offer), or a named QEMU model such as qemu64 or "
        "Skylake-Server. By default host-passthrough under KVM and QEMU's default model "
        "under TCG.",
        check=lambda model, settled: _check_cpu_model(model, settled),
    ),
    Setting(
        "Firmware", "firmware", _enum_parser(Firmware), "bios", "bios|uefi",
        "Guest firmware: bios (SeaBIOS) or uefi (OVMF, chosen by libvirt from the firmware "
        "descriptors installed on the host, without Secure Boot). A UEFI guest keeps its "
        "variables in NAME_VARS.fd in the VM's state directory, created from the firmware's "
        "template on first start.",
        choices=tuple(Firmware),
    ),
    Setting(
        "SecureBoot", "secure_boot", parse_bool, "no", "yes|no",
        "With yes, UEFI Secure Boot: OVMF built with Secure Boot and SMM, its variable "
        "store holding Microsoft's keys (which sign Debian's shim), so a guest whose boot "
        "chain is signed (shim, GRUB and kernel) boots and an unsigned boot loader is "
        "refused by the firmware. Needs Firmware=uefi and a q35 machine. The variables "
        "are created from that store on the first start (qemu-unit reset NAME starts "
        "afresh).",
        check=lambda on, settled: _check_secure_boot(on, settled),
    ),
    Setting(
        "TPM", "tpm", parse_bool, "no", "yes|no",
        "With yes, a TPM 2.0 (CRB interface) emulated by swtpm (package swtpm-tools), "
        "started by libvirt as the VM's user. Its state (keys, NV indexes, PCR policy "
        "secrets) lives in lib/swtpm/ in the VM's state directory: it is kept across "
        "restarts, so secrets the guest seals to the TPM (systemd-creds "
        "--with-key=tpm2, BitLocker, LUKS) stay usable, and removed by qemu-unit reset "
        "NAME.",
    ),
    Setting(
        "Kernel", "kernel", parse_path, None, "PATH",
        "Boot this Linux kernel directly instead of booting from a disk (absolute path). Not "
        "set by default.",
        specifiers=True,
        names_file=_same_path,
    ),
    Setting(
        "Initrd", "initrd", parse_path, None, "PATH",
        "Initial ramdisk for Kernel= (absolute path). Needs Kernel=. Not set by default.",
        specifiers=True,
        requires="Kernel",
        names_file=_same_path,
    ),
    Setting(
        "KernelCmdline", "kernel_cmdline", parse_cmdline, None, "ARGS",
        "Kernel command line for Kernel=. The values of its assignments are joined with "
        "spaces, so a drop-in can add arguments. Write %% for a literal %. For the console "
        "to reach the journal the guest must print to the first serial port (console=ttyS0). "
        "Needs Kernel=. Empty by default.",
        repeatable=True,
        specifiers=True,
        requires="Kernel",
        collect=lambda a: " ".join(a.values("KernelCmdline")) or None,
    ),
    Setting(
        "Image", "image", parse_image, None, "PATH|URL",
        "A bootable base image (qcow2 or raw, e.g. a distribution's cloud image; absolute "
        "path), shared by any number of VMs and never written: the VM boots from its own "
        "qcow2 overlay, image.qcow2 in its state directory, backed by the base with the "
        "base's format written into it (QEMU never probes it). The overlay is made on the "
        "first start and kept across restarts, so the guest's changes persist until "
        "qemu-unit reset NAME. If the base changes after the overlay was made, the runner "
        "says so in the journal and does not rebase. The image is the first (boot) disk; "
        "Disk= adds more. It boots through its own boot loader (Firmware=bios|uefi) or with "
        "Kernel=. An https://, http:// or file:// URL is pulled into the shared image cache "
        "(/var/lib/qemu-run/images/, content-addressed, read-only to VMs) by "
        "qemu-run-pull@KEY.service, which the VM's unit wants; the start waits for it "
        "(STATUS= shows bytes and percent) and boots only bytes that ImageChecksum= or "
        "ImageChecksums= vouched for (or ImageVerify=no). .xz, .gz and .zst images are "
        "decompressed while downloading. Write %% for a % in a URL. Not set by default.",
        specifiers=True,
        collect=lambda a: _local_image(a),
        names_file=_local_path,
    ),
    Setting(
        "ImageChecksum", "image_source", parse_image_checksum, None, "sha256:HEX|sha512:HEX",
        "The digest of Image='s URL: of the file as downloaded or, for a compressed one, "
        "of either the download or its decompressed content. A mismatch keeps nothing. "
        "Needs an Image= URL; not with ImageChecksums=.",
        requires="Image",
        collect=lambda a: _image_source(a),
    ),
    Setting(
        "ImageChecksums", "image_source", parse_url, None, "URL",
        "The URL of a SHA256SUMS/SHA512SUMS file (GNU or BSD lines, clear-signed or not, as "
        "Debian, Ubuntu and Fedora publish them) that lists Image='s file by name: the entry "
        "for the URL's file name checks the download, an entry for the name without "
        ".xz/.gz/.zst checks the decompressed image. Needs an Image= URL.",
        requires="Image",
    ),
    Setting(
        "ImageSignature", "image_source", parse_url, None, "URL",
        "The URL of a detached OpenPGP signature of ImageChecksums= (e.g. SHA256SUMS.gpg); "
        "checked with gpgv against ImageKeyring= before any image byte is fetched. A "
        "clear-signed sums file needs only ImageKeyring=.",
        requires="ImageChecksums",
    ),
    Setting(
        "ImageKeyring", "image_source", parse_path, None, "PATH",
        "The OpenPGP keys (a binary keyring, as gpg --export writes it) that must have "
        "signed ImageChecksums=, checked with gpgv. Needs ImageChecksums=.",
        requires="ImageChecksums",
        specifiers=True,
        names_file=_same_path,
    ),
    Setting(
        "ImageVerify", "image_source", parse_bool, None, "yes|no",
        "With no, an Image= URL without ImageChecksum=/ImageChecksums= is pulled and booted "
        "unverified; without it such a URL is refused.",
        requires="Image",
    ),
    Setting(
        "AutoUpdate", "auto_update", _enum_parser(AutoUpdate), "no", "no|yes|reset",
        "Move the VM to a new image when ImageChecksums= names one: qemu-unit auto-update "
        "(run daily by qemu-unit-auto-update.timer, which qemu-unit install enables) re-reads "
        "the sums, pulls the new image, restarts the VM on it and, when the VM does not "
        "become ready within its start timeout, goes back to the previous image and restarts "
        "it again; the journal says what changed. yes is for Ephemeral=yes VMs (every start "
        "is a first boot anyway); reset discards a kept overlay (as qemu-unit reset) to boot "
        "the new image. Needs an Image= URL with ImageChecksums=.",
        choices=tuple(AutoUpdate),
        requires="Image",
        check=lambda value, settled: _check_auto_update(value, settled),
    ),
    Setting(
        "Ephemeral", "ephemeral", parse_bool, "no", "yes|no",
        "With yes, Image='s overlay lives in the runtime directory and is gone when the unit "
        "stops: every start is a first boot and nothing the guest writes is kept (as podman "
        "run --rm). Needs Image=.",
        requires="Image",
    ),
    Setting(
        "DiskSize", "disk_size", parse_disk_size, None, "SIZE",
        "The virtual size of Image='s overlay, as Memory= reads sizes, so that the guest "
        "(cloud-init's growpart) can grow its root file system. Only ever grows the "
        "overlay: a size below the current one is reported and ignored. Needs Image=. "
        "By default the base image's size.",
        requires="Image",
    ),
    Setting(
        "Disk", "disks", parse_disk, None, "PATH[,OPTION...]",
        "A disk image or block device (absolute path), followed by comma-separated options: "
        "format=raw|qcow2|qed|vmdk|vdi|vpc|vhdx, readonly (only on virtio and scsi), "
        "bus=virtio|sata|scsi|ide (default virtio; ide only on Machine=pc), "
        "cache=default|none|writeback|writethrough|directsync|unsafe. Write ,, for a comma "
        "in the path. A disk the guest can write never chooses its own format (a guest "
        "writing a raw disk could plant a qcow2 header that opens a host file): without "
        "format= a writable disk is raw, and one that starts with the qcow2 magic is "
        "refused (write format=qcow2); a readonly disk without format= is qcow2 if it "
        "starts with the magic (and has no backing file), raw otherwise. Any qcow2 image "
        "with an external data file (data_file=) or incompatible feature bits QEMU 7.2 "
        "does not know is refused. One disk each. The first disk is the boot disk.",
        repeatable=True,
        specifiers=True,
        check=lambda disk, settled: _check_disk_bus(disk, settled),
        names_file=_disk_path,
        writes_file=lambda disk: not disk.readonly,
    ),
    Setting(
        "CDROM", "cdroms", parse_path, None, "PATH",
        "An ISO image attached as a read-only CD-ROM (absolute path). The VM boots from "
        "disks first, then from CD-ROMs.",
        repeatable=True,
        specifiers=True,
        names_file=_same_path,
    ),
    Setting(
        "Network", "networks", parse_network, "user", "none|user|tap:IFACE|bridge:BRIDGE",
        "A network interface (virtio): user is QEMU's user-mode network (outgoing "
        "connections through the host, no configuration, unprivileged). What a guest on "
        "it can reach: what the host can connect to, except the host itself: every "
        "host-local address (its loopback through 10.0.2.2, its other addresses as "
        "themselves) is refused by the unit's guest firewall (AllowHostLoopback=yes opens "
        "127.0.0.0/8 and ::1; RestrictNetwork=yes cuts everything but PublishPort=); "
        "connections to its PublishPort= ports come in; tap:IFACE uses an "
        "existing tap device owned by the VM's user; bridge:BRIDGE attaches to a host bridge "
        "through qemu-bridge-helper. none means no network interface at all. One interface "
        "each. For example tap:vm-%i. Without any Network= a VM has one user interface.",
        repeatable=True,
        specifiers=True,
        collect=lambda a: _networks(a.lists.get("Network"), a.lists.get("MAC", [])),
    ),
    Setting(
        "MAC", "networks", parse_mac, None, "ADDRESS",
        "MAC address of the interfaces, matched to Network= in order: the first MAC= goes to "
        "the first interface (without Network=, to the default user interface). More MAC= "
        "than interfaces, or one address twice, is an error. An interface without a MAC= "
        "gets a stable address derived from the VM name and the interface's index, with the "
        "prefix 52:54:00.",
        repeatable=True,
        collect=lambda a: _networks(a.lists.get("Network"), a.lists.get("MAC", [])),
    ),
    Setting(
        "UUID", "uuid", parse_uuid, None, "UUID",
        "The domain's UUID (also the guest's SMBIOS system UUID). By default a stable "
        "UUID derived from the VM name (UUID version 5), the same on every start and "
        "every host.",
    ),
    Setting(
        "Console", "console", _enum_parser(ConsoleMode), "journal", "journal|none",
        "Where the guest's first serial port goes: journal sends each line the guest prints "
        "to the journal of the VM's unit; none gives the guest no serial port. With "
        "DomainXML=, journal takes the domain's first serial port.",
        choices=tuple(ConsoleMode),
        with_domain_xml=True,
    ),
    Setting(
        "ConsoleLog", "console_log", parse_console_log, "8M", "SIZE|no",
        "Keep a complete copy of everything the guest prints on its console "
        "(Console=journal) in console.log in the VM's logs directory "
        "(/var/log/qemu-run/NAME/ for qemu-run@NAME.service), whatever the journal drops. "
        "When the file would grow past SIZE (as Memory= reads sizes, at least 1M) it is "
        "renamed to console.log.1, replacing the older one, so the copy takes at most twice "
        "SIZE. no turns the copy off.",
        with_domain_xml=True,
    ),
    Setting(
        "ConsoleRateLimitIntervalSec", "console_rate_interval", parse_timespan, "30s",
        "TIMESPAN",
        "With ConsoleRateLimitBurst=, how many console lines the journal gets: at most "
        "ConsoleRateLimitBurst= lines in each interval of this length; the lines beyond are "
        "not sent (console.log still has them, see ConsoleLog=) and one line in the unit's "
        "journal says how many were not sent and where the complete copy is. 0 turns the "
        "limit off. This limit replaces journald's for the console: the unit sets journald's "
        "own (LogRateLimitBurst=) far above what a serial console can print, so that "
        "journald drops neither console lines nor the runner's messages on its own. 30s is "
        "journald's default interval.",
        with_domain_xml=True,
    ),
    Setting(
        "ConsoleRateLimitBurst", "console_rate_burst", parse_count, "10000", "LINES",
        "How many console lines the journal gets per ConsoleRateLimitIntervalSec= (see "
        "there). 0 turns the limit off. 10000 is journald's default burst.",
        with_domain_xml=True,
    ),
    Setting(
        "ShutdownMode", "shutdown_mode", parse_shutdown_mode, "acpi", "METHOD...",
        "How the VM is asked to shut down when its unit stops: a space-separated list of "
        "acpi (press the ACPI power button) and agent (ask the QEMU guest agent, which adds "
        "a guest agent channel to the VM), tried in order until one is accepted; agent acpi "
        "tries the agent first. The last assignment wins. When the guest has not powered off "
        "after ShutdownTimeout=, it is destroyed.",
        choices=tuple(ShutdownMethod),
        with_domain_xml=True,
    ),
    Setting(
        "ShutdownTimeout", "shutdown_timeout", parse_timespan, "60s", "TIMESPAN",
        "How long to wait for the guest to power off before destroying it, as a systemd time "
        "span: 90s, 2min, 1min 30s, 500ms; a plain number is seconds; 0 destroys at once. "
        "The unit's TimeoutStopSec= is set a little longer.",
        with_domain_xml=True,
    ),
    Setting(
        "HostShutdown", "host_shutdown", _enum_parser(HostShutdown), "shutdown",
        "shutdown|save",
        "What happens to the running VM when the host shuts down or reboots: shutdown asks "
        "the guest to shut down as any stop does (ShutdownMode=); save saves the running "
        "guest's memory and device state (libvirt's save) into the VM's state directory "
        "and stops it without the guest noticing, and the next start restores it, its "
        "processes and all (the guest clock is then set through the guest agent when one "
        "answers). A plain systemctl stop still shuts the guest down; qemu-unit save NAME "
        "saves by hand. A saved state that no longer fits the VM (its domain or its Image= "
        "base changed) or fails its checksum is never restored nor dropped: the start "
        "fails and says to run qemu-unit discard-save NAME. A save that fails (a full "
        "disk) leaves no file behind and falls back to shutdown. The unit's stop timeout "
        "leaves room for the save.",
        choices=tuple(HostShutdown),
        with_domain_xml=True,
        check=lambda value, settled: _check_host_shutdown(value, settled),
    ),
    Setting(
        "SnapshotSchedule", "snapshot_schedule", parse_calendar, None, "CALENDAR",
        "Take a snapshot (qemu-unit snapshot create --scheduled) at these times, an "
        "OnCalendar= expression of systemd.time(7) such as daily or *-*-* 03:00:00: the "
        "generator writes qemu-run-snapshot@NAME.timer for it, started with timers.target. "
        "Its snapshots are named auto-DATE-TIME; SnapshotKeep= says how many are kept.",
        with_domain_xml=True,
    ),
    Setting(
        "SnapshotKeep", "snapshot_keep", parse_count, "7", "N",
        "How many scheduled snapshots (auto-...) are kept: after each one, the oldest beyond "
        "N are deleted. 0 keeps them all. Snapshots taken by hand are never deleted.",
        with_domain_xml=True,
    ),
    Setting(
        "BackupSchedule", "backup_schedule", parse_calendar, None, "CALENDAR",
        "Add a backup point to BackupTo= (qemu-unit backup --scheduled) at these times, an "
        "OnCalendar= expression of systemd.time(7) such as daily: the generator writes "
        "qemu-run-backup@NAME.timer for it (Persistent=yes: a time missed while the host was "
        "off runs at the next boot). The first point is full, later ones incremental while "
        "the VM runs; BackupKeep= bounds the chain.",
        requires="BackupTo",
        with_domain_xml=True,
    ),
    Setting(
        "BackupTo", "backup_to", parse_path, None, "DIR",
        "The backup directory of BackupSchedule= (made when missing, as by qemu-unit backup "
        "NAME DIR; qemu-unit restore DIR rebuilds the VM from it).",
        requires="BackupSchedule",
        with_domain_xml=True,
    ),
    Setting(
        "BackupKeep", "backup_keep", parse_count, "7", "N",
        "After each scheduled backup, the points the last N do not need are removed, and a "
        "new chain (a full point) is started once the last one has N points (qemu-unit "
        "backup --keep N). 0 keeps them all.",
        requires="BackupSchedule",
        with_domain_xml=True,
    ),
    Setting(
        "Ready", "ready", parse_ready, "started", "started|agent|healthy|console:REGEX",
        "When the unit reports readiness to systemd (Type=notify): started as soon as QEMU "
        "runs the guest; agent once the QEMU guest agent in the guest answers (a booted "
        "userspace; adds a guest agent channel, as ShutdownMode=agent does); healthy once "
        "the first HealthCmd= check passes (as Quadlet's Notify=healthy); console:REGEX "
        "once a line the guest prints on its console matches the Python regular expression "
        "REGEX (searched anywhere in the line), which needs Console=journal. Units ordered "
        "After= this one wait for that.",
        with_domain_xml=True,
        check=lambda ready, settled: _check_ready(ready, settled),
    ),
    Setting(
        "HealthCmd", "health_cmd", parse_health_cmd, None, "COMMAND",
        "A health check, with Podman's (Quadlet's) meaning: COMMAND is run in the guest "
        "through the QEMU guest agent (by /bin/sh -c, as root, in the agent's environment) "
        "every HealthInterval=; exit status 0 is healthy. The VM's state (starting, healthy, "
        "unhealthy), its failing streak and the check's last output are in qemu-unit "
        "status/list --json and the unit's status text; each change of state is a journal "
        "entry with the fields QEMU_UNIT_HEALTH=, QEMU_UNIT_HEALTH_STREAK= and "
        "QEMU_UNIT_HEALTH_OUTPUT=. A check that cannot run (no agent answers, it outlives "
        "HealthTimeout=) fails. Adds a guest agent channel (the guest needs "
        "qemu-guest-agent). Checks run in a thread of the runner and never delay its main "
        "loop or watchdog. none: no check.",
    ),
    Setting(
        "HealthInterval", "health_interval", parse_health_interval, "30s", "TIMESPAN",
        "Time between the end of one health check and the start of the next (the first "
        "runs as soon as the VM runs), at least 1s.",
        requires="HealthCmd",
    ),
    Setting(
        "HealthTimeout", "health_timeout", parse_timespan, "30s", "TIMESPAN",
        "How long a health check may run; it is killed and counts as failed after.",
        requires="HealthCmd",
    ),
    Setting(
        "HealthRetries", "health_retries", parse_health_retries, "3", "N",
        "How many failed checks in a row make the VM unhealthy.",
        requires="HealthCmd",
    ),
    Setting(
        "HealthStartPeriod", "health_start_period", parse_timespan, "0", "TIMESPAN",
        "A grace period from the VM's start (say, its boot time) during which failed checks "
        "do not count (the state stays starting); the first check that passes ends it.",
        requires="HealthCmd",
    ),
    Setting(
        "HealthOnFailure", "health_on_failure", _enum_parser(HealthAction), "none",
        "none|kill|restart|stop",
        "What happens when the VM turns unhealthy, with Quadlet's meaning: none only "
        "reports it; kill destroys the VM at once and the runner fails (exit 1), so the "
        "unit's Restart=on-failure starts it again; restart reboots the guest in place (the "
        "unit stays active; the state is starting again); stop shuts the guest down as "
        "systemctl stop does and the unit ends (exit 0, no restart).",
        choices=tuple(HealthAction),
        requires="HealthCmd",
    ),
    Setting(
        "PublishPort", "publish_ports", parse_publish_port, None,
        "[[IP:]HOSTPORT:]GUESTPORT[/tcp|/udp]",
        "Forward HOSTPORT on the host (on IP, an IPv4 address, else on every address) to "
        "GUESTPORT of the guest's first user network (Network=user), as podman run --publish "
        "spells it; tcp by default. Use 127.0.0.1: to keep a port to this host. A host port "
        "that is already taken fails the start with a message naming it. Ports below 1024 "
        "need privileges the unit does not have.",
        repeatable=True,
        collect=lambda a: _published_ports(a),
    ),
    Setting(
        "RestrictNetwork", "restrict_network", parse_bool, "no", "yes|no",
        "With yes, the user networks (Network=user) are isolated (QEMU's restrict=on): the "
        "guest can reach nothing outside, neither the host nor the internet (QEMU's DHCP "
        "still names 10.0.2.3 as DNS server, but no query gets out); PublishPort= forwards "
        "still reach it. Together with published ports bound to 127.0.0.1 the unit's sandbox "
        "then only allows loopback traffic.",
    ),
    Setting(
        "AllowHostLoopback", "allow_host_loopback", parse_bool, "no", "yes|no",
        "With yes, a guest on a user network (Network=user) reaches the host's loopback "
        "(127.0.0.0/8, ::1) through 10.0.2.2, as Podman's allow_host_loopback does. By "
        "default a guest reaches no address of the host at all: an nftables table of the "
        "VM's own (inet qemu-run-NAME) refuses every new connection from the unit to a "
        "host-local address, the host's other addresses included whatever this says; "
        "connections to PublishPort= ports, and DNS through a local stub resolver named in "
        "/etc/resolv.conf, still work. No effect with RestrictNetwork=yes (the guest reaches "
        "nothing) or without a user network.",
    ),
    Setting(
        "Share", "shares", parse_share, None, "HOSTDIR:TAG[:ro]",
        "Share the host directory HOSTDIR (absolute path, without ':' or ',') with "
        "the guest through virtio-fs under the tag TAG (up to 36 of A-Z a-z 0-9 _ . -). "
        "For each share a virtiofsd companion unit, "
        "qemu-run-virtiofsd@NAME:TAG.service, runs as root (Debian's virtiofsd needs it), "
        "confined to HOSTDIR without network; it starts before the VM and never outlives "
        "it, and its socket is reachable by the VM's user only. With :ro the directory is "
        "mounted read-only for the daemon, so no guest write reaches it. The VM gets "
        "shared memory (memfd). A guest with a cloud-init seed (see UserData=) mounts "
        "each share at /mnt/TAG, or where ShareMount= says, at every boot. Any other Linux "
        "guest (kernel module virtiofs, Linux 5.4 or later) mounts it itself: once with "
        "mount -t virtiofs TAG /mnt/TAG, or at every boot with the /etc/fstab line "
        "TAG /mnt/TAG virtiofs defaults,nofail 0 0 (add ro for a :ro share); Windows "
        "guests need virtio-win's virtiofs service. HOSTDIR must exist when the VM starts. "
        "May be repeated, each tag once.",
        repeatable=True,
        specifiers=True,
        collect=lambda a: _shares(a),
    ),
    Setting(
        "ShareMount", "shares", parse_share_mount, None, "TAG:PATH",
        "Where a guest with a cloud-init seed mounts the share TAG (a Share= tag) instead "
        "of /mnt/TAG: an absolute path of A-Z a-z 0-9 _ . @ + -, made if missing. The seed's "
        "vendor-data writes an /etc/fstab line and mounts it at every boot. May be "
        "repeated, each tag and each path once; a guest without a seed ignores it.",
        repeatable=True,
    ),
    Setting(
        "UserData", "user_data", parse_path, None, "PATH",
        "A cloud-init user-data file (e.g. a #cloud-config file; absolute path), handed to "
        "the guest in a NoCloud seed: an ISO 9660 image labelled cidata, written into the "
        "runtime directory at every start and attached as a read-only virtio disk. Any of "
        "UserData=, SSHAuthorizedKey=, Hostname= or NetworkConfig= adds the seed; its "
        "meta-data has a stable instance-id (from the domain UUID). Not set by default (an "
        "empty cloud-config).",
        specifiers=True,
        names_file=_same_path,
    ),
    Setting(
        "SSHAuthorizedKey", "ssh_authorized_keys", parse_ssh_key, None, "KEY|PATH",
        "An SSH public key (as in authorized_keys) or the absolute path of a file of keys, "
        "installed by cloud-init for the image's default user (debian on Debian, ubuntu on "
        "Ubuntu); goes into the seed's meta-data as public-keys.",
        repeatable=True,
        names_file=lambda key: key if isinstance(key, Path) else None,
    ),
    Setting(
        "Hostname", "hostname", parse_hostname, None, "NAME",
        "The guest's host name, set by cloud-init (local-hostname in the seed's "
        "meta-data). Defaults to the VM name made a valid host name (lower case; "
        "characters other than a-z, 0-9 and - become -).",
    ),
    Setting(
        "NetworkConfig", "network_config", parse_path, None, "PATH",
        "A cloud-init network-config file (version 1 or 2; absolute path) for the seed. "
        "Without it cloud-init configures DHCP on the first interface.",
        specifiers=True,
        names_file=_same_path,
    ),
    Setting(
        "SetCredential", "credentials", parse_set_credential, None, "ID:VALUE",
        "A systemd credential for the guest, as systemd's SetCredential= spells it (the "
        "value is taken literally): passed through QEMU's fw_cfg "
        "(opt/io.systemd.credentials/ID), which systemd in the guest imports into "
        "/run/credentials/@system/ID. The value goes into a file only the VM's user can read "
        "in the runtime directory, removed when the VM stops; it is never on a command line, "
        "in the journal or in qemu-unit render output. ID: up to 28 of A-Z a-z 0-9 _ . @ -. "
        "A later assignment of the same ID wins, and LoadCredential= of the same ID wins "
        "over it.",
        repeatable=True,
        collect=lambda a: _credentials(a),
    ),
    Setting(
        "LoadCredential", "credentials", parse_load_credential, None, "ID[:PATH]",
        "A systemd credential for the guest read from PATH (absolute), or without PATH from "
        "the unit's own credential ID ($CREDENTIALS_DIRECTORY/ID): so a secret given to the "
        "unit with LoadCredential= or LoadCredentialEncrypted= in [Service] reaches the "
        "guest without lying in clear anywhere else. Passed like SetCredential=. A missing "
        "or unreadable file fails the start. A later assignment of the same ID wins.",
        repeatable=True,
        collect=lambda a: _credentials(a),
        names_file=lambda cred: cred.path,
    ),
    Setting(
        "DomainXML", "domain_xml", parse_path, None, "PATH",
        "Use this complete libvirt domain XML file (absolute path) instead of describing the "
        "VM with the keys above. The runner sets the domain's name and type (kvm or qemu, as "
        "Accel= decides; with Accel=auto as the file's <domain type=> says), points its "
        "first serial port at the runner's console socket (Console=journal) and its guest "
        "agent channel at the runner's socket, and keeps UEFI variables in the VM's state "
        "directory unless the file names an <nvram> path. The host paths the file names "
        "(disk images and directories, file system sources, kernel, firmware, the "
        "emulator...) must exist when the VM starts. Only Accel=, Console=, the Console*= "
        "keys, ShutdownMode=, ShutdownTimeout= and Ready= may be used with it: any other key "
        "is an error. A NAME.xml file in the search path is the same as a NAME.vm with only "
        "DomainXML=.",
        specifiers=True,
        names_file=_same_path,
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
# The rows whose values name host files (host.check_files checks them in this order).
_FILE_SETTINGS = tuple(s for s in SETTINGS if s.names_file is not None)


# Specifiers, as in systemd unit files, but only these. %i is what a template
# VM is parameterised by: the instance of 'base@inst', else the whole name.
SPECIFIERS = {
    "n": "the full VM name",
    "i": "the instance of a template VM (base@INSTANCE), else the full VM name",
    "p": "the prefix of a template VM (PREFIX@instance), else the full VM name",
    "%": "a literal %",
}


def expand_specifiers(value: str, name: str, entry: Entry) -> str:
    if "%" not in value:
        return value
    split = split_template(name)
    table = {
        "n": name,
        "i": split[1] if split else name,
        "p": split[0] if split else name,
        "%": "%",
    }

    def substitute(match: re.Match[str]) -> str:
        spec = match.group(1)
        if spec not in table:
            raise _fail(entry, f"unknown specifier %{spec} (known: %n %i %p %%)")
        return table[spec]

    return re.sub(r"%(.?)", substitute, value, flags=re.DOTALL)


def stable_mac(name: str, index: int) -> str:
    import hashlib  # on first use: it loads OpenSSL

    digest = hashlib.sha256(f"{name}\0{index}".encode()).digest()
    return f"{MAC_PREFIX}:{digest[:3].hex(':')}"


def stable_uuid(name: str) -> str:
    import uuid  # on first use: it imports platform

    return str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, UUID_NAMESPACE_URL), name))


_UNSAFE_CHAR = "[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff\ufffe\uffff]"


def _has_unsafe_char(value: str) -> bool:
    """Whether VALUE holds a character XML 1.0 cannot carry (a tab is fine)."""
    if value.isascii():
        # Printable ASCII is " " to "~": no regex (compiling this one costs every boot ~0.4 ms).
        return not value.replace("\t", " ").isprintable()
    return re.search(_UNSAFE_CHAR, value) is not None


def _unknown_key(entry: Entry) -> ConfigError:
    import difflib  # only on this error path: it costs the generator ~10 ms at every boot

    hint = difflib.get_close_matches(entry.key, BY_NAME, n=1)
    if not hint:
        hint = [n for n in BY_NAME if n.lower() == entry.key.lower()]
    suggestion = f" (did you mean {hint[0]}=?)" if hint else ""
    return _fail(entry, f"unknown key in [{VM_SECTION}]{suggestion}")


@functools.cache
def _field_plan() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...],
                           tuple[tuple[str, Callable[[_Assignments], Any]], ...]]:
    """Each VMConfig field once, by how parse_vm fills it: the value in effect, the list
    of values, or its row's collect (several rows may share a field: the first row's
    builds it, e.g. MAC= with Network=). Worked out once: the generator parses every VM."""
    seen: set[str] = set()
    fields, lists, collected = [], [], []
    for setting in SETTINGS:
        if setting.field in seen:
            continue
        seen.add(setting.field)
        if setting.collect is not None:
            collected.append((setting.field, setting.collect))
        elif setting.repeatable:
            lists.append((setting.field, setting.name))
        else:
            fields.append((setting.field, setting.name))
    return tuple(fields), tuple(lists), tuple(collected)


@functools.cache
def _defaults() -> dict[str, Any]:
    """Every single-valued key's default, parsed like a value (once: every VM needs them)."""
    return {
        s.name: None if s.default is None else s.parse(s.default, _DEFAULT_ENTRY)
        for s in SETTINGS
        if not s.repeatable
    }


class _Assignments:
    """The [VM] values in effect, each with the assignment that set it."""

    def __init__(self) -> None:
        self.single: dict[str, tuple[Any, Entry]] = {}
        self.lists: dict[str, list[tuple[Any, Entry]]] = {}

    def assign(self, setting: Setting, value: str, entry: Entry) -> None:
        if setting.repeatable:
            if not value:
                self.lists[setting.name] = []
            else:
                parsed = setting.parse(value, entry)
                self.lists.setdefault(setting.name, []).append((parsed, entry))
        elif not value:
            self.single.pop(setting.name, None)
        else:
            self.single[setting.name] = (setting.parse(value, entry), entry)

    def settled(self) -> dict[str, Any]:
        """Every single-valued key's value in effect: as assigned, else its default."""
        return _defaults() | {key: value for key, (value, _) in self.single.items()}

    def values(self, key: str) -> list[Any]:
        return [v for v, _ in self.lists.get(key, [])]

    def entries(self, key: str) -> list[Entry]:
        """The assignments of KEY in effect (for a list key, one per item)."""
        if key in self.single:
            return [self.single[key][1]]
        return [e for _, e in self.lists.get(key, [])]

    def assigned(self, key: str) -> list[tuple[Any, Entry]]:
        """(value, assignment) of each value of KEY in effect."""
        if key in self.single:
            return [self.single[key]]
        return self.lists.get(key, [])

    def keys(self) -> list[str]:
        return [*self.single, *(k for k, items in self.lists.items() if items)]


def _check_combinations(a: _Assignments, settled: dict[str, Any]) -> None:
    """Refuse what each key allows alone but not together, as the rows say."""
    domain_xml = settled["DomainXML"] is not None
    for key in a.keys():
        setting = BY_NAME[key]
        if domain_xml and not setting.with_domain_xml and setting.field != "domain_xml":
            raise _fail(a.entries(key)[0], "not allowed with DomainXML=: the domain XML "
                        "file says it")
        if setting.requires is not None and setting.requires not in a.keys():
            raise _fail(a.entries(key)[0], f"needs {setting.requires}=")
        if setting.check is not None:
            for value, entry in a.assigned(key):
                problem = setting.check(value, settled)
                if problem is not None:
                    raise _fail(entry, problem)


def parse_vm(
    name: str,
    unit: UnitFile,
    *,
    source_path: Path | None = None,
    dropins: tuple[Path, ...] = (),
    domain_xml: Path | None = None,
) -> VMConfig:
    """Build the VMConfig of VM NAME from parsed UNIT (pure: reads no file).

    DOMAIN_XML: the VM is this NAME.xml file (as if DomainXML= named it, but not an
    assignment: errors about it name the file alone); UNIT holds its drop-ins."""
    passthrough: dict[str, list[Entry]] = {s: [] for s in PASSTHROUGH_SECTIONS}
    a = _Assignments()
    for entry in unit.entries:
        if entry.section in passthrough:
            passthrough[entry.section].append(entry)
            continue
        if entry.section.startswith(EXTENSION_PREFIX):
            continue
        if entry.section != VM_SECTION:
            known = ", ".join(f"[{s}]" for s in (VM_SECTION, *PASSTHROUGH_SECTIONS))
            raise _fail(entry, f"unknown section [{entry.section}] (known: {known})")
        setting = BY_NAME.get(entry.key)
        if setting is None:
            if entry.key.startswith(EXTENSION_PREFIX):
                continue
            raise _unknown_key(entry)
        if _has_unsafe_char(entry.value):
            # Not representable in XML 1.0, and never meant.
            shown = "(not shown)" if entry.key in SECRET_KEYS else repr(entry.value)
            raise _fail(entry, f"value {shown} contains a control character")
        value = entry.value
        if setting.specifiers:
            value = expand_specifiers(value, name, entry)
        a.assign(setting, value, entry)
    settled = a.settled()
    own_xml = domain_xml is not None and settled["DomainXML"] is None
    if own_xml:
        settled["DomainXML"] = domain_xml
    _check_combinations(a, settled)

    fields, lists, collected = _field_plan()
    values: dict[str, Any] = {attr: settled[key] for attr, key in fields}
    for attr, key in lists:
        items = a.lists.get(key)
        values[attr] = tuple(v for v, _ in items) if items else ()
    for attr, collect in collected:
        values[attr] = collect(a)
    files = [
        FileRef(path, entry, s.writes_file is not None and s.writes_file(value))
        for s in _FILE_SETTINGS if s.names_file is not None
        for value, entry in a.assigned(s.name)
        if (path := s.names_file(value)) is not None
    ]
    if own_xml:
        files.insert(0, FileRef(settled["DomainXML"], None))
    if source_path is None:
        source_path = Path(unit.path)
    return VMConfig(
        name=name,
        # A Path is immutable: the Source's own serves (one Path less per VM at boot).
        source_path=source_path if isinstance(source_path, Path) else Path(source_path),
        dropins=dropins,
        unit=tuple(passthrough["Unit"]),
        service=tuple(passthrough["Service"]),
        install=tuple(passthrough["Install"]),
        files=tuple(files),
        # What keys() and entries() give, in one pass.
        origins=(
            *(e for _, e in a.single.values()),
            *(e for items in a.lists.values() for _, e in items),
        ),
        **values,
    )


def _credentials(a: _Assignments) -> tuple[Credential, ...]:
    """SetCredential= then LoadCredential=, one per ID: later wins, LoadCredential= over Set."""
    by_id: dict[str, Credential] = {}
    for key in ("SetCredential", "LoadCredential"):
        for cred in a.values(key):
            by_id.pop(cred.id, None)
            by_id[cred.id] = cred
    return tuple(by_id.values())


def _published_ports(a: _Assignments) -> tuple[PublishedPort, ...]:
    """PublishPort= (and RestrictNetwork=) need a user network; a host port is published once."""
    networks = _networks(a.lists.get("Network"), a.lists.get("MAC", []))
    has_user = any(n.kind is NetworkKind.USER for n in networks)
    restrict = a.single.get("RestrictNetwork", (False, None))[0]
    for key in ("PublishPort", "RestrictNetwork"):
        entries = a.entries(key)
        if entries and not has_user and (key == "PublishPort" or restrict):
            raise _fail(entries[0], "needs a user network (Network=user)")
    published: list[tuple[PublishedPort, Entry]] = []
    for port, entry in a.lists.get("PublishPort", []):
        for other, other_entry in published:
            # "" is every address: it clashes with any address on the same port.
            same_ip = not port.host_ip or not other.host_ip or port.host_ip == other.host_ip
            if (port.protocol, port.host_port) == (other.protocol, other.host_port) and same_ip:
                raise _fail(entry, f"host port {port.host_port}/{port.protocol} is already "
                                   f"published by line {other_entry.line}")
        published.append((port, entry))
    return tuple(port for port, _ in published)


# Defaults are parsed like values; a bad default is a bug, and this names it.
_DEFAULT_ENTRY = Entry(VM_SECTION, "(default)", "", "<built-in default>", 0)


def _networks(
    networks: list[tuple[Any, Entry]] | None,
    macs: list[tuple[str, Entry]],
) -> tuple[Network, ...]:
    """Pair Network= with MAC= in order; no Network= at all means one user interface."""
    if networks is None:
        default = BY_NAME["Network"].default or "none"
        networks = [(parse_network(default, _DEFAULT_ENTRY), _DEFAULT_ENTRY)]
    nics = [v for v, _ in networks if v is not None]
    if len(nics) != len(networks) and nics:
        none_entry = next(e for v, e in networks if v is None)
        raise _fail(none_entry, "none cannot be combined with other Network= interfaces")
    if len(macs) > len(nics):
        raise _fail(macs[len(nics)][1], f"more MAC= than Network= interfaces ({len(nics)})")
    seen: dict[str, Entry] = {}
    for mac, entry in macs:
        if mac in seen:
            raise _fail(entry, f"MAC address {mac} is already used (line {seen[mac].line})")
        seen[mac] = entry
    given = [mac for mac, _ in macs]
    return tuple(
        Network(kind, target, given[i] if i < len(given) else "")  # "": VMConfig.macs()
        for i, (kind, target) in enumerate(nics)
    )


def read_source(source: Source) -> UnitFile:
    """The entries of SOURCE and its drop-ins: what load_vm() reads."""
    if source.kind == "vm":
        unit = read(source.path, source.dropins)
    else:
        # A NAME.xml is a NAME.vm with only DomainXML= (build_vm says so); its drop-ins apply.
        dropins = [e for d in source.dropins for e in read(d).entries]
        unit = UnitFile(str(source.path), tuple(dropins))
    check_secret_files(unit)
    return unit


def check_secret_files(unit: UnitFile) -> None:
    """ConfigError for a file holding a SetCredential= value that other users can read:
    the secret is the VM's and root's only. Never names the value."""
    import os
    import stat

    checked = set()
    for entry in unit.entries:
        if entry.key != "SetCredential" or entry.section != VM_SECTION or not entry.value:
            continue
        if entry.path in checked:
            continue
        checked.add(entry.path)
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue  # read a moment ago: gone again, the next read says so
        if mode & stat.S_IROTH:
            raise ConfigError(
                "SetCredential= in a file other users can read: chmod 0600 it (root only; "
                "the unit hands it to the VM as a credential), or keep the value in a file "
                "of its own named by LoadCredential=",
                path=entry.path, line=entry.line, key=entry.key)


def build_vm(source: Source, unit: UnitFile) -> VMConfig:
    """The VMConfig of SOURCE from UNIT, its read_source() (pure: reads no file)."""
    return parse_vm(source.name, unit, source_path=source.path, dropins=source.dropins,
                    domain_xml=source.path if source.kind == "xml" else None)


def load_vm(source: Source) -> VMConfig:
    """Read SOURCE (and its drop-ins) and build its VMConfig."""
    return build_vm(source, read_source(source))
