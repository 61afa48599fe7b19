"""The generator's conversion: one VMConfig -> its drop-in text and [Install] links.

Pure, as Quadlet's ConvertContainer is: `convert(vm)` writes nothing and reads
nothing but a DomainXML= file (the host paths and interfaces it names); main.py
does all the I/O. The template's sandbox and what each VM needs on top of it are
explained in implied_service().
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from qemu_unit import paths
from qemu_unit.config import rootless, settings
from qemu_unit.config.unitfile import Entry, escape_specifiers, format_line
from qemu_unit.errors import ConfigError
from qemu_unit.generator import shares
from qemu_unit.records import NamedTuple

PROGRAM = "qemu-unit-generator"
TEMPLATE = paths.TEMPLATE_UNIT
DROPIN = paths.GENERATOR_DROPIN
# One instance per image source (ImageSource.key()): every VM on it wants the same unit,
# so VMs starting together queue one pull job.
PULL_ARGS_ENV = "QEMU_UNIT_PULL_ARGS"
# What a guest on a user network reaches of the host (vm/firewall.py reads it).
HOST_ACCESS_ENV = paths.HOST_ACCESS_ENV
HOST_SHUTDOWN_ENV = paths.HOST_SHUTDOWN_ENV
# The root steps some VMs need (the guest firewall, the stop note), written only into
# their drop-ins: this installation's interpreter (the generator's own, like the
# template's register step), isolated (-I: root ignores the VM user's HOME and PYTHON*).
ROOT_STEP = f"{escape_specifiers(sys.executable)} -I -m qemu_unit"
# The static user of VMs that cannot have one of their own (tap and bridge networks,
# disks written outside the state directory).
SERVICE_USER = paths.SERVICE_USER
SYSTEM_STATE = paths.SYSTEM_STATE
# Each other VM's own user; systemd's strict user names (dynamic-user.c).
DYNAMIC_USER_PREFIX = paths.DYNAMIC_USER_PREFIX
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")

# Seconds systemd waits beyond ShutdownTimeout=: after the guest's own timeout the
# runner still destroys the domain and tears down the embed root; systemd must
# not SIGKILL it in the middle of that.
STOP_MARGIN_SEC = 10
# HostShutdown=save: systemd's stop timeout leaves room for writing the guest's memory
# on top of the shutdown a failed save falls back to; the runner also extends it while
# the save makes progress. From the save of a 1 GiB Debian guest under TCG (README).
SAVE_SECONDS_PER_GIB = 60
SAVE_SECONDS_MIN = 30


def save_seconds(memory: int) -> int:
    """Seconds a save of MEMORY bytes may take, with room for a loaded host."""
    return max(SAVE_SECONDS_MIN, -(-memory * SAVE_SECONDS_PER_GIB // 1024**3))

# Where a distribution package puts the template. systemd resolves a .wants/
# link by its own name (the target only needs a compatible name), so a link
# here still starts the right unit once the template is installed anywhere.
FALLBACK_TEMPLATE = os.fspath(paths.VENDOR_UNIT_DIR / TEMPLATE)
# The same for a user's manager (rootless VMs).
USER_FALLBACK_TEMPLATE = os.fspath(paths.VENDOR_USER_UNIT_DIR / TEMPLATE)

# systemd's unit-name alphabet (basic/unit-name.c); "@" is allowed in instances.
# Instances are checked with str.strip() (nothing left: valid), without the
# backslash systemd allows, as instance_unit() explains.
_UNIT_NAME = re.compile(
    r"[A-Za-z0-9:_.\\-]+(?:@(?P<instance>[A-Za-z0-9:_.\\@-]*))?"
    r"\.(?:service|socket|device|mount|automount|swap|target|path|timer|slice|scope)"
)
UNIT_NAME_MAX = 255
_NEEDS_QUOTES = re.compile(r"[\s\"'\\]")

# [Install] keys the generator turns into links: key -> directory suffix.
INSTALL_LINKS = {"WantedBy": "wants", "RequiredBy": "requires"}

# Where ProtectHome=yes hides files, and where PrivateTmp=yes does.
_HOME_DIRS = ("/home/", "/root/", "/run/user/")
_TMP_DIRS = ("/tmp/", "/var/tmp/")

class Generated(NamedTuple):
    """What one VM turns into, relative to the output directory. Writes nothing."""

    files: tuple[tuple[str, str], ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()


class HostNeeds(NamedTuple):
    """What a VM touches on the host, as far as the sandbox is concerned."""

    networks: tuple[str, ...] = ()  # 'user', 'user-loopback', 'tap', 'bridge'
    # (path, writable) of every file QEMU opens: disks, CD-ROMs, kernel, NVRAM...
    files: tuple[tuple[str, bool], ...] = ()
    warnings: tuple[str, ...] = ()
    # Configuration files others may not read (.vm, drop-ins, DomainXML=): the runner
    # gets them as unit credentials (files.read_config).
    private: tuple[str, ...] = ()


def instance_unit(name: str) -> str:
    """`qemu-run@NAME.service` for a VM name (names.check_name has accepted it).

    The template passes `%i` (the raw instance) to the runner; the VM name
    alphabet (names.py) is a subset of what systemd keeps verbatim in an
    instance, and names.MAX_LENGTH keeps the unit name far below 255.
    """
    return paths.unit_name(name)


def is_unit_name(name: str) -> bool:
    """Whether NAME is a unit name that may name a .wants/ directory (no template)."""
    match = _UNIT_NAME.fullmatch(name)
    if match is None or len(name) > UNIT_NAME_MAX:
        return False
    return match.group("instance") != ""


def quote(value: str) -> str:
    """VALUE as one word of a unit-file setting that expands %-specifiers."""
    value = escape_specifiers(value)
    if _NEEDS_QUOTES.search(value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _format_seconds(seconds: float) -> str:
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{round(seconds * 1000)}ms"


def _vm_needs(vm: settings.VMConfig) -> HostNeeds:
    """HostNeeds of a VM described by [VM] keys: the files are the ones its keys name
    (the key table's names_file column; Image='s overlay is in the state directory)."""
    files = [(str(ref.path), ref.writable) for ref in vm.files]
    kinds = [str(n.kind) for n in vm.networks]
    if vm.restrict_network:
        # An isolated user network opens host sockets only for published ports: on
        # loopback alone, or on every address; with none it needs no network at all.
        if not vm.publish_ports:
            kinds = [k for k in kinds if k != "user"]
        elif all(p.host_ip.startswith("127.") for p in vm.publish_ports):
            kinds = ["user-loopback" if k == "user" else k for k in kinds]
    return HostNeeds(tuple(kinds), tuple(files))


def _xml_needs(path: Path) -> HostNeeds:
    """HostNeeds of a domain XML file; ConfigError if it is not XML.

    An unreadable file (e.g. on a file system not mounted yet at boot) is only
    a warning: the VM is then assumed to need the host network and /dev/net/tun.
    """
    # Imported here: only VMs with DomainXML= pay for ElementTree.
    from qemu_unit.config import domainxml
    from qemu_unit.config.files import DOMAIN_XML_MAX, read_limited

    try:
        # Root at boot: never blocks on a FIFO, never reads a huge file (files.py).
        data = read_limited(path, DOMAIN_XML_MAX, what="domain XML")
    except OSError as e:
        warning = (
            f"{path}: cannot read ({e.strerror}); assuming the VM needs the host network"
        )
        return HostNeeds(("tap",), (), (warning,))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("cannot read domain XML: not valid UTF-8", path=path) from None
    root = domainxml.parse_domain_xml(text, path)
    networks = [
        str(settings.NetworkKind.for_interface(i.get("type", "")))
        for i in root.iterfind("./devices/interface")
    ]
    files = [(p.path, p.writable) for p in domainxml.xml_paths(root)]
    nvram = root.findtext("./os/nvram", "").strip()
    if nvram.startswith("/"):
        files.append((nvram, True))
    return HostNeeds(tuple(networks), tuple(files))


def _private_files(vm: settings.VMConfig) -> tuple[str, ...]:
    """The configuration files of VM that others cannot read (the VM's own user included)."""
    private = []
    for path in dict.fromkeys((vm.source_path, *vm.dropins, vm.domain_xml)):
        if path is None:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if not mode & 0o004:
            private.append(str(path))
    return tuple(private)


def host_needs(vm: settings.VMConfig) -> HostNeeds:
    private = _private_files(vm)
    if vm.domain_xml is None:
        return _vm_needs(vm)._replace(private=private)
    needs = _xml_needs(vm.domain_xml)
    # The runner reads the XML file itself, inside the same sandbox.
    return needs._replace(files=((str(vm.domain_xml), False), *needs.files), private=private)


def dynamic_user(name: str) -> str:
    """The name of VM NAME's own user (DynamicUser=): `qemu-vm-NAME`, or, where that is not
    a user name systemd allocates (at most 31 characters of A-Z a-z 0-9 _ -), qemu-vm- and
    a hash of NAME. Without a User= of its own every instance of qemu-run@ would get the
    one user named after the template's prefix, qemu-run."""
    user = f"{DYNAMIC_USER_PREFIX}{name}"
    if _USER_NAME.fullmatch(user):
        return user
    import hashlib  # only VMs with long or dotted names pay for it

    return DYNAMIC_USER_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:16]


def implied_service(vm: settings.VMConfig, needs: HostNeeds) -> list[tuple[str, str]]:
    """[Service] settings the VM needs on top of the template's sandbox.

    The template sandboxes every VM as if it had no network and no files
    outside its state directory: PrivateNetwork=yes, IPAddressDeny=any,
    DevicePolicy=closed with /dev/kvm only, no capabilities, ProtectSystem=strict,
    ProtectHome=yes, PrivateTmp=yes. Each need undoes exactly what it must:

    user    QEMU's user-mode stack opens ordinary host sockets: the host's
            network namespace, IP traffic allowed, and QEMU_UNIT_HOST_ACCESS=none
            (AllowHostLoopback=yes: loopback) for the template's guest-firewall
            steps, which refuse the unit's new connections to host-local addresses.
            With RestrictNetwork=yes (restrict=on: the guest reaches nothing, no
            firewall needed) only published ports open host sockets: none, nothing
            is relaxed; all on 127.x, IP traffic only with localhost
            (IPAddressAllow=localhost).
    user's  every VM runs as a user of its own (DynamicUser=, User=qemu-vm-NAME),
    own     except where that cannot work: a tap belongs to one user, the bridge
            helper is setuid (DynamicUser= forces NoNewPrivileges=), a disk written
            outside the VM's state directory was given to a user by name; those
            run as qemu-run (DynamicUser=no).
    tap     and /dev/net/tun; the tap device must already exist and belong to
            the qemu-run user (made by the administrator, e.g. systemd-networkd).
    bridge  and what qemu-bridge-helper needs to gain CAP_NET_ADMIN from its
            setuid bit or file capability: NoNewPrivileges=no, the capability in
            the bounding set, no user namespace (PrivateUsers= leaves root
            unmapped, so the setuid bit would not count). The helper itself must
            be setuid or `setcap cap_net_admin+ep` and /etc/qemu/bridge.conf must
            allow the bridge: that is host setup, not done here.
    private a configuration file only root can read (a .vm holding SetCredential=)
            becomes LoadCredential=: systemd reads it as root and hands the VM's
            user a copy (files.read_config).
    files   a writable disk becomes ReadWritePaths= (with "-": a missing file is
            the runner's error to report, not a namespace failure); a block
            device becomes DeviceAllow=; anything under /home, /root or
            /run/user needs ProtectHome=read-only, under /tmp or /var/tmp
            PrivateTmp=no (the private /tmp would hide it).
    """
    save = vm.host_shutdown is settings.HostShutdown.SAVE
    stop = vm.shutdown_timeout + STOP_MARGIN_SEC + (save_seconds(vm.memory) if save else 0)
    out: list[tuple[str, str]] = [("TimeoutStopSec", _format_seconds(stop))]
    if save:
        # Before the runner's SIGTERM, root asks systemd whether the host is shutting down
        # and leaves the answer for the runner (vm/saved.py).
        out += [("Environment", f"{HOST_SHUTDOWN_ENV}=save"),
                ("ExecStop", f"-+{ROOT_STEP} note-stop %i")]
    kinds = set(needs.networks)
    own = f"{SYSTEM_STATE}/{vm.name}/"
    if kinds & {"tap", "bridge"} or any(w and not f.startswith(own) for f, w in needs.files):
        out += [("DynamicUser", "no"), ("User", SERVICE_USER), ("Group", SERVICE_USER)]
    else:
        out.append(("User", dynamic_user(vm.name)))
        out += shares.handover_lines(vm, dynamic_user(vm.name))
    if kinds == {"user-loopback"}:
        # The host's network namespace, but IP traffic only on loopback.
        out += [("PrivateNetwork", "no"), ("IPAddressAllow", "localhost")]
    elif kinds:
        # The empty assignment resets the template's IPAddressDeny=any.
        out += [("PrivateNetwork", "no"), ("IPAddressDeny", "")]
    if "user" in kinds and not vm.restrict_network:
        # The guest firewall, loaded as root before the runner starts (vm/firewall.py); the
        # runner refuses to start the guest without it when this variable is set.
        access = "loopback" if vm.allow_host_loopback else "none"
        out += [("Environment", f"{HOST_ACCESS_ENV}={access}"),
                ("ExecStartPre", f"+{ROOT_STEP} guest-firewall start %i"),
                ("ExecStopPost", f"-+{ROOT_STEP} guest-firewall stop %i")]
    if kinds & {"tap", "bridge"}:
        out.append(("DeviceAllow", "/dev/net/tun rw"))
    if "bridge" in kinds:
        out += [
            ("NoNewPrivileges", "no"),
            ("PrivateUsers", "no"),
            ("CapabilityBoundingSet", "CAP_NET_ADMIN"),
        ]
    if needs.private:
        from qemu_unit.config.files import credential_id

        out += [("LoadCredential", f"{credential_id(p)}:{quote(p)}") for p in needs.private]
    paths = sorted(dict.fromkeys(needs.files))
    if any(p.startswith(_HOME_DIRS) for p, _ in paths):
        out.append(("ProtectHome", "read-only"))
    if any(p.startswith(_TMP_DIRS) for p, _ in paths):
        out.append(("PrivateTmp", "no"))
    for path, writable in paths:
        if path.startswith("/dev/"):
            out.append(("DeviceAllow", f"{quote(path)} {'rw' if writable else 'r'}"))
        elif writable:
            out.append(("ReadWritePaths", f"-{quote(path)}"))
    return out


def _section(name: str, lines: Iterable[tuple[str, str] | Entry]) -> str:
    """[NAME] and its lines, each written so that systemd reads back the same value;
    an Entry (from the .vm file) names its file and line if that cannot be done."""
    return f"[{name}]\n" + "".join([
        format_line(item.key, item.value, item) if isinstance(item, Entry)
        else format_line(*item)
        for item in lines
    ])


def install_links(vm: settings.VMConfig, unit: str, template: str) -> list[tuple[str, str]]:
    """The [Install] symlinks: TARGET.wants/UNIT -> TEMPLATE, as `systemctl enable` makes."""
    for entry in vm.install:
        # X- keys are extensions, which systemd ignores too.
        if entry.key not in INSTALL_LINKS and not entry.key.startswith(settings.EXTENSION_PREFIX):
            known = "=, ".join(INSTALL_LINKS)
            raise ConfigError(
                f"not supported in [Install] of a VM (only {known}=)",
                entry=entry,
            )
    links = []
    for key, targets in (("WantedBy", vm.wanted_by), ("RequiredBy", vm.required_by)):
        for target in targets:
            if not is_unit_name(target):
                # It names a directory: no "/" or "..", no template without instance.
                entry = next(e for e in vm.install if e.key == key and target in e.value.split())
                raise ConfigError(
                    f"invalid unit name {target!r}",
                    entry=entry,
                )
            links.append((f"{target}.{INSTALL_LINKS[key]}/{unit}", template))
    return links


def _runs_in_file_order(vm: settings.VMConfig) -> list[tuple[str, list[Entry]]]:
    """VM's [Unit] and [Service] entries in the order they were read, cut into runs of
    one section. systemd stops reading a file at a value it finds fatal (e.g. a
    relative ExecStartPre= path): in file order, the same lines are lost as in
    the .vm file read as a unit file."""
    files = {p: i for i, p in enumerate((str(vm.source_path), *map(str, vm.dropins)))}
    entries = sorted([*vm.unit, *vm.service], key=lambda e: (files.get(e.path, 0), e.line))
    runs: list[tuple[str, list[Entry]]] = []
    for entry in entries:
        if not runs or runs[-1][0] != entry.section:
            runs.append((entry.section, []))
        runs[-1][1].append(entry)
    return runs


def convert(vm: settings.VMConfig, *, template: str = FALLBACK_TEMPLATE,
            user: bool = False) -> Generated:
    """The drop-in and [Install] links for VM; TEMPLATE is what the links point at.

    USER: for a user's manager (config/rootless.py): what needs root is refused, the
    user template has no sandbox to relax, and multi-user.target is default.target.

    Pure apart from reading a DomainXML= file. The file's own [Service] entries
    come after the implied ones, so an explicit TimeoutStopSec= or
    PrivateNetwork= in the .vm file wins; its [Unit] and [Service] entries keep
    their order (a section header is repeated where the file switches back).
    """
    unit = instance_unit(vm.name)
    path = str(vm.source_path)
    if any(c in p for p in (path, *map(str, vm.dropins)) for c in "\n\r"):
        # systemd would end the comment or SourcePath= line there.
        raise ConfigError("file name contains a line end", path=path)
    if user and (problems := rootless.refusals(vm)):
        raise problems[0]
    needs = host_needs(vm)
    header = f"# Automatically generated by {PROGRAM} from {path}\n"
    header += "".join(f"# with drop-in {d}\n" for d in vm.dropins)
    runs = _runs_in_file_order(vm)
    # SourcePath= is one literal path (no quotes), but it does expand specifiers.
    unit_lines: list[tuple[str, str] | Entry] = [("SourcePath", escape_specifiers(path))]
    unit_lines += shares.unit_dependencies(vm)
    if runs and runs[0][0] == "Unit":
        unit_lines += runs.pop(0)[1]
    pull = pull_unit(vm)
    if pull is not None:
        # Wants= without After=: the runner starts at once and shows the pull's progress
        # in its own STATUS= while it waits (image.wait_for_pull).
        unit_lines.append(("Wants", pull[0]))
    implied = implied_service(vm, needs)
    # A user's template has no namespace sandbox to relax: only the stop timeout applies.
    service_lines: list[tuple[str, str] | Entry] = [*(implied[:1] if user else implied)]
    if runs and runs[0][0] == "Service":
        service_lines += runs.pop(0)[1]
    text = "\n".join([header, _section("Unit", unit_lines), _section("Service", service_lines),
                      *(_section(name, entries) for name, entries in runs)])
    links = install_links(vm, unit, template)
    if user:
        links = [(_user_link(link), target) for link, target in links]
    timers = schedule_timers(vm, path)
    links += [(f"timers.target.wants/{name}", f"../{name}") for name, _ in timers]
    return Generated(
        files=((f"{unit}.d/{DROPIN}", text), *(pull[1:] if pull else ()),
               *shares.files(vm, header, quote), *timers),
        symlinks=tuple(links),
        warnings=needs.warnings + shares.warnings(vm),
    )


def _user_link(link: str) -> str:
    """'multi-user.target.wants/UNIT' -> 'default.target.wants/UNIT' (a user manager's)."""
    directory, _, unit = link.partition("/")
    target, _, kind = directory.rpartition(".")
    return f"{rootless.user_target(target)}.{kind}/{unit}"


class Schedule(NamedTuple):
    """A [VM] key holding an OnCalendar= expression: the generator writes a timer for it that
    starts an instance (the VM's name) of an installed oneshot template."""

    field: str  # the VMConfig field holding the expression (None: no timer)
    prefix: str  # the template's prefix, "qemu-run-snapshot@"
    description: str


# One row per scheduled job.
SCHEDULES = (
    Schedule("snapshot_schedule", paths.SNAPSHOT_UNIT_PREFIX, "Scheduled snapshots"),
    Schedule("backup_schedule", paths.BACKUP_UNIT_PREFIX, "Scheduled backups"),
)


def schedule_timers(vm: settings.VMConfig, path: str) -> list[tuple[str, str]]:
    """The timers (file name, text) of VM's schedules (SCHEDULES) that are set."""
    timers = []
    for schedule in SCHEDULES:
        calendar = getattr(vm, schedule.field)
        if calendar is None:
            continue
        name = paths.timer_name(schedule.prefix, vm.name)
        text = (f"# Automatically generated by {PROGRAM} from {path}\n\n"
                + _section("Unit", [("Description", f"{schedule.description} of VM {vm.name}"),
                                    ("SourcePath", escape_specifiers(path))])
                + "\n" + _section("Timer", [("OnCalendar", calendar), ("Persistent", "yes")]))
        timers.append((name, text))
    return timers


def pull_unit(vm: settings.VMConfig) -> tuple[str, tuple[str, str]] | None:
    """(unit name, its drop-in file) of the pull of VM's Image= URL; None for a local image.

    The drop-in only names the source: the same for every VM on it, whichever
    writes it last."""
    src = vm.image_source
    if src is None:
        return None
    if src.keyring is not None and any(c.isspace() for c in str(src.keyring)):
        entry = vm.origin("ImageKeyring")
        raise ConfigError("a keyring path with white space cannot be passed to the pull unit",
                          path=entry.path if entry else vm.source_path,
                          line=entry.line if entry else None, key="ImageKeyring")
    name = paths.pull_unit_name(src.key())
    args = " ".join(src.pull_arguments())
    # Environment= splits on white space outside quotes: one quoted assignment.
    quoted = args.replace("\\", "\\\\").replace('"', '\\"')
    text = (f"# Automatically generated by {PROGRAM}: the image source of Image= "
            f"{src.url.replace(chr(10), '')}\n\n" + _section("Service", [(
                "Environment", escape_specifiers(f'"{PULL_ARGS_ENV}={quoted}"'))]))
    return name, (f"{name}.d/{DROPIN}", text)
