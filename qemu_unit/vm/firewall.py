"""The guest firewall: what a guest on QEMU's user network (slirp) may reach on the host.

QEMU's user network opens ordinary host sockets from the VM's own processes, in the host's
network namespace: a guest's connection to 10.0.2.2 becomes a connection to the host's
127.0.0.1, and one to any other host address is made as the host would make it. QEMU 7.2
has no switch against either (only restrict=on, which cuts everything). So the unit runs
`qemu-unit guest-firewall start NAME` as root (ExecStartPre=+) before the runner: one
nftables table per VM, `inet qemu-run-NAME`, whose output chain rejects every new connection
from a socket of the unit's cgroup (the runner, libvirt, QEMU) to a local address of the
host (`fib daddr type local`): loopback and every other address of the host. With
AllowHostLoopback=yes (QEMU_UNIT_HOST_ACCESS=loopback) 127.0.0.0/8 and ::1 stay open.
Connections made *to* the guest (PublishPort=) are inbound, established when QEMU answers,
never `ct state new` from the unit: they keep working. A local DNS stub named in
/etc/resolv.conf (e.g. systemd-resolved's 127.0.0.53) stays open on port 53, because slirp's
10.0.2.3 forwards the guest's queries to it.

The socket's cgroup, not its uid: every process of the unit and nothing else, whatever
user it runs as (VMs that cannot have a user of their own share the static qemu-run).
nftables resolves the cgroup path when the rule is loaded, so the unit's cgroup must exist:
it does while ExecStartPre= runs in it. `level` counts from the root of the cgroup
namespace of the process loading the rule (Linux >= 6.11 and its stable backports; a
container's systemd sees its own root), which is the root /proc/self/cgroup shows.

After loading, the step checks the rule from inside the cgroup: a connection to a listener
of its own on an address the guest must not reach has to be refused. Either way the step
leaves a note in the runtime directory ("loaded", or why not) and the runner, the unit's
main process, refuses to start without "loaded" (exit 78): a VM never runs open by
accident, and the start fails once, not in Restart= loop (RestartPreventExitStatus= counts
only the main process's status). `guest-firewall stop NAME` (ExecStopPost=-+) removes the table.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path

from qemu_unit import command, log, paths
from qemu_unit.config.names import check_name
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.records import NamedTuple
from qemu_unit.vm import notes

CGROUP_ROOT = Path("/sys/fs/cgroup")
# On a hybrid (v1 + v2) host the v2 hierarchy is mounted here; nft looks up every cgroup
# path relative to /sys/fs/cgroup.
HYBRID_SUBDIR = "unified"
RESOLV_CONF = Path("/etc/resolv.conf")
CHECK_TIMEOUT = 2.0
NFT = "nft"
# nft's identifiers: a letter, then letters, digits, '/', '\\', '_', '.', '-'.
_TABLE_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class HostAccess(enum.StrEnum):
    """What of the host a guest on a user network reaches (QEMU_UNIT_HOST_ACCESS=)."""

    NONE = "none"  # no host-local address at all
    LOOPBACK = "loopback"  # 127.0.0.0/8 and ::1 (AllowHostLoopback=yes), no other

    @classmethod
    def parse(cls, value: str) -> HostAccess:
        try:
            return cls(value)
        except ValueError:
            known = "|".join(m.value for m in cls)
            raise QemuUnitError(
                f"${paths.HOST_ACCESS_ENV}={value!r}: expected {known}") from None


def table_name(name: str) -> str:
    """`qemu-run-NAME`, or, where NAME has characters nft refuses in a name (@ :), those
    replaced by '_' and a hash of NAME appended so that two VMs never share a table."""
    safe = _TABLE_UNSAFE.sub("_", name)
    table = f"{paths.FIREWALL_TABLE_PREFIX}{safe}"
    if safe != name:
        import hashlib  # only names with @ or : pay for it, at every start of their VM

        table += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return table


class Cgroup(NamedTuple):
    """A cgroup v2 as nft's `socket cgroupv2 level LEVEL "NFT_PATH"` names it."""

    path: str  # as /proc/self/cgroup shows it: /machine.slice/qemu-run@web.service
    nft_path: str  # relative to /sys/fs/cgroup: machine.slice/... or unified/machine.slice/...
    level: int  # components below the (namespace's) root

    @property
    def selector(self) -> str:
        return f'socket cgroupv2 level {self.level} "{self.nft_path}"'


def own_cgroup(proc_cgroup: str, cgroup_root: Path = CGROUP_ROOT) -> Cgroup:
    """The cgroup v2 of this process from the text of /proc/self/cgroup ("0::PATH"), and
    where nft finds it: /sys/fs/cgroup (unified host) or /sys/fs/cgroup/unified (hybrid)."""
    line = next((ln for ln in proc_cgroup.splitlines() if ln.startswith("0::")), None)
    if line is None:
        raise QemuUnitError("no cgroup v2 (/proc/self/cgroup has no 0:: line): the guest "
                            "firewall needs the unified cgroup hierarchy")
    path = line[3:]
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or not parts or any(p in (".", "..") for p in parts) or any(
            c in path for c in '"\\\n'):
        raise QemuUnitError(f"cgroup {path!r} cannot be matched by the guest firewall")
    relative = "/".join(parts)
    if (cgroup_root / "cgroup.controllers").exists():
        nft_path = relative
    elif (cgroup_root / HYBRID_SUBDIR / "cgroup.controllers").exists():
        nft_path = f"{HYBRID_SUBDIR}/{relative}"
    else:
        raise QemuUnitError(f"no cgroup v2 hierarchy under {cgroup_root}: the guest "
                            "firewall needs it")
    if not (cgroup_root / nft_path).is_dir():
        raise QemuUnitError(f"{cgroup_root / nft_path}: no such cgroup")
    return Cgroup(path, nft_path, len(parts))


def local_nameservers(resolv_conf: str) -> tuple[str, ...]:
    """The loopback addresses among resolv.conf's `nameserver` lines (slirp's 10.0.2.3
    forwards the guest's DNS queries to the host's first nameserver)."""
    found: list[str] = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                continue
            if address.is_loopback and str(address) not in found:
                found.append(str(address))
    return tuple(found)


def ruleset(table: str, cgroup: Cgroup, access: HostAccess,
            nameservers: Sequence[str] = ()) -> str:
    """The nft script that replaces TABLE in one transaction (the empty `table` line makes
    `delete` safe when it does not exist yet)."""
    match = f"{cgroup.selector} ct state new"
    rules = []
    for server in nameservers:
        family = "ip6" if ":" in server else "ip"
        rules.append(f"{match} {family} daddr {server} meta l4proto {{ tcp, udp }} "
                     "th dport 53 accept")
    if access is HostAccess.LOOPBACK:
        rules += [f"{match} ip daddr 127.0.0.0/8 accept", f"{match} ip6 daddr ::1 accept"]
    rules.append(f"{match} fib daddr type local reject")
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return (f"table inet {table}\n"
            f"delete table inet {table}\n"
            f"table inet {table} {{\n"
            f"\tchain output {{\n"
            f"\t\ttype filter hook output priority filter; policy accept;\n"
            f"{body}"
            f"\t}}\n"
            f"}}\n")


def check_targets(access: HostAccess) -> list[str]:
    """Local addresses a guest must not reach, to check the rule against: 127.0.0.1, or
    with loopback allowed the first IPv4 address of each interface that is not loopback
    (none on a host with loopback only: nothing to check)."""
    if access is HostAccess.NONE:
        return ["127.0.0.1"]
    import fcntl
    import struct

    siocgifaddr = 0x8915
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, ifname in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr,
                                  struct.pack("256s", ifname.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            address = socket.inet_ntoa(raw[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                found.append(address)
    return found


def refused(address: str) -> bool:
    """Whether a new TCP connection from this process to a listener of its own on ADDRESS
    is refused. Without the rule it would be accepted (the listener is there)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener, \
            socket.socket(family, socket.SOCK_STREAM) as client:
        listener.bind((address, 0))
        listener.listen(1)
        client.settimeout(CHECK_TIMEOUT)
        try:
            client.connect(listener.getsockname()[:2])
        except ConnectionRefusedError:
            return True
        except OSError as e:
            # reject sends an ICMP error: refused, or for some types unreachable.
            return e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES,
                               errno.EPERM)
        return False


# The note the start step leaves for the runner: LOADED, or why not.
NOTE = "guest-firewall"
LOADED = "loaded"


def start(name: str, access: HostAccess, roots: Path = paths.SYSTEM_RUNTIME) -> int:
    """`qemu-unit guest-firewall start NAME` as the unit's ExecStartPre=+ (root, in the
    unit's cgroup): load the table and check it, and say how it went in a note the runner
    reads (require()): the runner, the main process, then refuses with exit 78, which
    ends the start for good (RestartPreventExitStatus= counts the main process only: a
    failing ExecStartPre= would be restarted until the start limit). Without a runtime
    directory to leave the note in (a start by hand), a failure is this command's."""
    check_name(name)
    try:
        _load(name, access)
    except QemuUnitError as e:
        try:
            notes.leave(roots / name, NOTE, str(e))
        except OSError:
            raise e from None
        # The runner says it, as its one error line.
        log.log.info("Guest firewall of %s not loaded: the runner refuses to start", name)
        return 0
    try:
        notes.leave(roots / name, NOTE, LOADED)
    except OSError as e:
        log.log.warning("Guest firewall of %s: no note for the runner (%s)", name, e)
    return 0


def require(root: Path) -> None:
    """The runner's side: refuse to start (ConfigError, exit 78) unless the start step
    left LOADED in the runtime directory ROOT."""
    try:
        said = notes.read(root, NOTE)
    except OSError as e:
        said = (f"the unit's guest-firewall step left no note ({e.strerror or e}); not "
                "starting the VM with its guest able to reach the host's own addresses")
    if said != LOADED:
        raise ConfigError(said)


def _load(name: str, access: HostAccess) -> None:
    table = table_name(name)
    cgroup = own_cgroup(Path("/proc/self/cgroup").read_text())
    try:
        servers = local_nameservers(RESOLV_CONF.read_text(errors="replace")[:65536])
    except OSError:
        servers = ()
    script = ruleset(table, cgroup, access, servers)
    try:
        command.run_bytes([NFT, "-f", "-"], "loading the guest firewall",
                          input=script.encode(), timeout=30)
    except command.CommandError as e:
        raise QemuUnitError(f"guest firewall for {name}: {e}; not starting the VM with "
                            "its guest able to reach the host's own addresses (run it "
                            "with RestrictNetwork=yes or Network=none where nftables "
                            "cannot work)") from e
    for address in check_targets(access):
        if not refused(address):
            stop(name)
            raise QemuUnitError(
                f"guest firewall for {name}: table inet {table} loaded but a connection "
                f"from {cgroup.path} to {address} was not refused; not starting the VM")
    log.log.info("Guest firewall: table inet %s (cgroup %s, level %d): host %s", table,
                 cgroup.path, cgroup.level,
                 "loopback allowed, its other addresses refused" if access is
                 HostAccess.LOOPBACK else "addresses refused")


def stop(name: str) -> int:
    """`qemu-unit guest-firewall stop NAME` (ExecStopPost=-+): remove the table if any."""
    check_name(name)
    table = table_name(name)
    command.run_bytes([NFT, "-f", "-"], "removing the guest firewall",
                      input=f"table inet {table}\ndelete table inet {table}\n".encode(),
                      timeout=30)
    return 0


def from_environment(name: str, action: str) -> int:
    """The verb: ACTION start or stop; the mode from $QEMU_UNIT_HOST_ACCESS."""
    if action == "stop":
        return stop(name)
    value = os.environ.get(paths.HOST_ACCESS_ENV, "")
    return start(name, HostAccess.parse(value or HostAccess.NONE.value))
