"""Every file, directory, socket and unit name of qemu-unit's layout on the host.

The one owner of these facts: no other module writes one of them as a literal
(tests/test_layout.py fails when one does). Standard library only, because the
generator imports it at boot.

System VMs (qemu-run@NAME.service, the runner as root by hand) keep their files in
the unit's directories: StateDirectory=qemu-run/NAME (persistent: NVRAM, overlay,
libvirt's lib/), RuntimeDirectory=qemu-run/NAME (the embed root: sockets, status
file, seed, credentials), CacheDirectory=qemu-run (QEMU's capability cache, shared
by every VM), LogsDirectory=qemu-run/NAME (console.log). An unprivileged runner uses
the XDG equivalents (see finalize_dirs).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qemu_unit.records import NamedTuple

# -- users, units, installed files -----------------------------------------------------------

# The user the unit runs as; the runner becomes it when root starts it by hand.
SERVICE_USER = "qemu-run"
# Each VM's own user (DynamicUser=) is this and its name (generator.dynamic_user).
DYNAMIC_USER_PREFIX = "qemu-vm-"
# The project's directory name below /etc, /run, /var/lib, /var/cache, /var/log, XDG dirs.
PROJECT_DIR = "qemu-run"
UNIT_PREFIX = "qemu-run@"
UNIT_SUFFIX = ".service"
TEMPLATE_UNIT = f"{UNIT_PREFIX}{UNIT_SUFFIX}"
# The guest firewall (vm/firewall.py): each VM's nftables table is `inet qemu-run-NAME`; the
# generator tells the unit's root step what a guest may reach in this variable.
FIREWALL_TABLE_PREFIX = f"{PROJECT_DIR}-"
HOST_ACCESS_ENV = "QEMU_UNIT_HOST_ACCESS"
# Set (to "save") by the generator for HostShutdown=save: the unit's ExecStop=+ note-stop
# step runs only then.
HOST_SHUTDOWN_ENV = "QEMU_UNIT_HOST_SHUTDOWN"
# The generator's drop-in in qemu-run@NAME.service.d/.
GENERATOR_DROPIN = "50-qemu-unit.conf"
# Where a distribution package puts the template.
VENDOR_UNIT_DIR = Path("/usr/lib/systemd/system")


# Image= URLs (issue 17): one pull unit per image source, run by its own user, which owns
# the shared cache (StateDirectory=qemu-run/images); VMs only read it.
PULL_USER = "qemu-run-pull"
PULL_UNIT_PREFIX = "qemu-run-pull@"
PULL_TEMPLATE_UNIT = f"{PULL_UNIT_PREFIX}{UNIT_SUFFIX}"
IMAGES_DIR = "images"
IMAGE_CACHE_ENV = "QEMU_UNIT_IMAGES"


# qemu-unit auto-update, run daily by its timer (qemu-unit install enables it).
AUTO_UPDATE_SERVICE = "qemu-unit-auto-update.service"
AUTO_UPDATE_TIMER = "qemu-unit-auto-update.timer"
# Scheduled snapshots (SnapshotSchedule=): the generator writes one timer per VM; the
# service it starts is an installed template.
SNAPSHOT_UNIT_PREFIX = "qemu-run-snapshot@"
SNAPSHOT_TEMPLATE_UNIT = f"{SNAPSHOT_UNIT_PREFIX}{UNIT_SUFFIX}"


# Scheduled backups (BackupSchedule=): the same, with qemu-run-backup@.
BACKUP_UNIT_PREFIX = "qemu-run-backup@"
BACKUP_TEMPLATE_UNIT = f"{BACKUP_UNIT_PREFIX}{UNIT_SUFFIX}"


# The machined registration of a running VM (root, once qemu-run@NAME is active).
REGISTER_TEMPLATE_UNIT = f"qemu-run-register@{UNIT_SUFFIX}"


def timer_name(prefix: str, name: str) -> str:
    """`PREFIXNAME.timer`, e.g. qemu-run-snapshot@NAME.timer (SnapshotSchedule= of VM NAME)."""
    return f"{prefix}{name}.timer"


def pull_unit_name(key: str) -> str:
    """`qemu-run-pull@KEY.service`: the pull of the image source KEY (ImageSource.key())."""
    return f"{PULL_UNIT_PREFIX}{key}{UNIT_SUFFIX}"


def unit_name(name: str) -> str:
    """`qemu-run@NAME.service`: the unit of VM NAME (names.check_name has accepted it)."""
    return f"{UNIT_PREFIX}{name}{UNIT_SUFFIX}"


# -- where VM definitions live (source.py's search path) -------------------------------------

CONFIG_DIR = Path("/etc") / PROJECT_DIR
# The unit's RuntimeDirectory=qemu-run/%i lives here: the embed root of each system VM.
# It is also a search directory (a VM defined at runtime lives until reboot).
SYSTEM_RUNTIME = Path("/run") / PROJECT_DIR
SEARCH_PATH: tuple[Path, ...] = (
    CONFIG_DIR,
    SYSTEM_RUNTIME,
    Path("/usr/local/lib") / PROJECT_DIR,
    Path("/usr/lib") / PROJECT_DIR,
)
# Rootless VMs (config/rootless.py): what an administrator gives one user (users/UID) or
# every user, after the user's own $XDG_CONFIG_HOME/qemu-run; the user manager's template.
USERS_CONFIG_DIR = CONFIG_DIR / "users"
VENDOR_USER_UNIT_DIR = Path("/usr/lib/systemd/user")


def user_config_home() -> Path:
    """$XDG_CONFIG_HOME, else ~/.config (HOME from the environment, else the passwd entry)."""
    env = os.environ.get("XDG_CONFIG_HOME")
    if env and env.startswith("/"):
        return Path(env)
    home = os.environ.get("HOME")
    if not home:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    return Path(home) / ".config"


def user_search_path() -> tuple[Path, ...]:
    """A user's .vm directories, the first wins."""
    return (user_config_home() / PROJECT_DIR, USERS_CONFIG_DIR / str(os.getuid()),
            USERS_CONFIG_DIR)


SYSTEM_STATE = Path("/var/lib") / PROJECT_DIR
SYSTEM_CACHE = Path("/var/cache") / PROJECT_DIR
SYSTEM_LOGS = Path("/var/log") / PROJECT_DIR
# The shared image cache (images/cache.py has its layout).
SYSTEM_IMAGES = SYSTEM_STATE / IMAGES_DIR

# -- files in the embed root (Dirs.root) -----------------------------------------------------

LOCK_FILE = "qemu-unit.lock"  # flock()ed by the runner while it runs; holds its PID
STATUS_FILE = "status.json"  # vm/status.py
# The domain UUID as 32 hex digits, for the unit's machined registration: a shell reads it
# (qemu-run-register@.service, root), which cannot parse status.json.
UUID_FILE = "uuid"
CONSOLE_SOCKET = "console.sock"  # QEMU's serial console
ATTACH_SOCKET = "console-attach.sock"  # `qemu-unit console` clients
AGENT_SOCKET = "agent.sock"  # the guest agent's channel
CONTROL_SOCKET = "control.sock"  # `qemu-unit exec/cp/...` reach the runner (vm/control.py)
# systemd's SystemState when the unit's stop began, left by its ExecStop=+ root step for the
# runner (HostShutdown=save: "stopping" means the host goes down; vm/saved.py).
STOP_NOTE = "stop-note"
SEED = "seed.iso"  # the cloud-init NoCloud seed
CREDENTIALS_DIR = "credentials"  # SetCredential= files, gone once QEMU runs
QEMU_CONF = "etc/qemu.conf"  # what the embed driver reads at open

# -- files in the state directory (Dirs.state) -----------------------------------------------

OVERLAY = "image.qcow2"  # Image='s overlay (Ephemeral=yes: in the embed root)
BASE_RECORD = "image.base"  # what the base looked like when the overlay was made
# HostShutdown=save / qemu-unit save (vm/saved.py): the save image and its record, made in
# SAVING_DIR and renamed to SAVED_DIR whole.
SAVED_DIR = "saved"
SAVING_DIR = "saved.new"
SAVED_MEMORY = "memory"
SAVED_META = "meta.json"
# Snapshots (vm/snapshot.py): one directory each (its record, a copy of the NVRAM).
SNAPSHOTS_DIR = "snapshots"

# Backups (vm/backup.py): the definitions of libvirt checkpoints, given back at each start.
CHECKPOINTS_DIR = "checkpoints"


def checkpoints_dir(state: Path) -> Path:
    """Where the VM with state directory STATE keeps its checkpoint definitions."""
    return state / CHECKPOINTS_DIR


# Where a running VM's QEMU sees the backup point being written (a bind mount into the
# unit's mount namespace: ProtectSystem=strict makes the backup directory read-only there).
BACKUP_MOUNT = ".backup"
# A VM restored from a --standalone backup boots from its own copy of the flattened disk.
RESTORED_BASE = "base.qcow2"

# -- files in a backup directory (vm/backup.py) ----------------------------------------------

BACKUP_MANIFEST = "manifest.json"
BACKUP_LOCK = ".lock"  # flock()ed by a backup or restore
BACKUP_PARTIAL_SUFFIX = ".partial"  # a point (or a restored file) being written
BACKUP_VM_FILE = "vm"
BACKUP_NVRAM = "nvram"
BACKUP_TPM = "tpm.tar"

# -- files in the logs directory (Dirs.logs) and the cache (Dirs.cache) ----------------------

CONSOLE_LOG = "console.log"
PROBE_LOCK = "probe.lock"  # serialises QEMU's capability probe on a cold cache
# The unit that probes QEMU's capabilities into SYSTEM_CACHE once per host (vm/caps.py),
# and each VM's own copy of them, in its state directory.
CAPS_UNIT = "qemu-unit-caps.service"
CAPS_COPY = "capabilities-copy"
CAPABILITIES = Path("qemu") / "capabilities"  # below a cache directory, as libvirt keeps it


# TPM=: swtpm's state, kept by libvirt's embed driver in ROOT/lib/swtpm/UUID/ (ROOT/lib
# links to STATE/lib). Snapshots and backups of a VM's TPM take this directory; reset
# removes it.
TPM_STATE = "lib/swtpm"


def tpm_state_dir(state: Path) -> Path:
    """Where swtpm keeps the TPM of the VM whose state directory is STATE."""
    return state / TPM_STATE


def nvram_file(name: str) -> str:
    """A UEFI VM's variable store in its state directory."""
    return f"{name}_VARS.fd"


# -- the per-VM directories ------------------------------------------------------------------


class Dirs(NamedTuple):
    """Where the runner keeps a VM's files (see finalize_dirs)."""

    state: Path  # persistent: NVRAM, the overlay, libvirt's lib/
    root: Path  # the embed root; volatile
    cache: Path  # shared by every VM of the host: QEMU capabilities
    logs: Path  # console.log, the console's complete copy

    @property
    def console_socket(self) -> Path:
        return self.root / CONSOLE_SOCKET

    @property
    def attach_socket(self) -> Path:
        """Where `qemu-unit console` connects (console.py serves it)."""
        return self.root / ATTACH_SOCKET

    @property
    def agent_socket(self) -> Path:
        return self.root / AGENT_SOCKET

    @property
    def control_socket(self) -> Path:
        """Where `qemu-unit exec/cp/...` reach the runner (vm/control.py serves it)."""
        return self.root / CONTROL_SOCKET

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def status_file(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def console_log(self) -> Path:
        return self.logs / CONSOLE_LOG


def _first(env: str) -> Path | None:
    value = os.environ.get(env)
    return Path(value.split(":")[0]) if value else None


def finalize_dirs(name: str) -> Dirs:
    """The unit's State/Runtime/Cache/LogsDirectory=, or per-user defaults."""
    home = Path(os.environ.get("HOME") or "/")
    root = _first("RUNTIME_DIRECTORY")
    if os.geteuid() == 0:
        state, cache = SYSTEM_STATE, SYSTEM_CACHE
        root = root or SYSTEM_RUNTIME / name
    else:
        state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local/state") / PROJECT_DIR
        cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / PROJECT_DIR
        root = root or private_runtime_dir() / PROJECT_DIR / name
    unit_state = _first("STATE_DIRECTORY")
    state_dir = unit_state or state / name
    # Unprivileged, the logs live in the VM's state directory, wherever that was put.
    logs = SYSTEM_LOGS / name if os.geteuid() == 0 else state_dir
    if unit_state is not None and "CACHE_DIRECTORY" not in os.environ:
        # Under the unit: the VM's own copy of the shared cache (caps.seed), made afresh in
        # its runtime directory at each start (~80 KB): a full state disk stays the
        # runner's "No space left" error, not a failed capability probe.
        cache = root / CAPS_COPY
    return Dirs(
        state=state_dir,
        root=root,
        cache=_first("CACHE_DIRECTORY") or cache,
        logs=_first("LOGS_DIRECTORY") or logs,
    )


def private_runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR, checked to be this user's own (a directory, not a link, owned by
    us, no access for others); QemuUnitError otherwise. Never a /tmp fallback: another
    local user can create a predictable name there first (and plant links in it)."""
    from qemu_unit.errors import QemuUnitError

    value = os.environ.get("XDG_RUNTIME_DIR")
    if not value or not value.startswith("/"):
        raise QemuUnitError(
            "no private runtime directory: $XDG_RUNTIME_DIR is not set (a login session "
            "sets it; or give one with RUNTIME_DIRECTORY=, a directory only you can use)")
    try:
        st = os.lstat(value)
    except OSError as e:
        raise QemuUnitError(f"$XDG_RUNTIME_DIR {value}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise QemuUnitError(
            f"$XDG_RUNTIME_DIR {value} is not a private directory of this user (it must be "
            f"a directory owned by uid {os.geteuid()} with mode 0700, not a link)")
    return Path(value)


# -- Share= (issue 19): a virtiofsd companion unit per share -------------------------------

# Debian 12's virtiofsd (QEMU's C daemon, package qemu-system-common); it needs root.
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
VIRTIOFSD_UNIT_PREFIX = "qemu-run-virtiofsd@"
# Below /run: a directory per VM, one per share in it, holding the socket.
VIRTIOFSD_RUNTIME = "qemu-run-virtiofsd"
# The group that may reach a share's socket: the VM's user's (the unit's User=).
SHARE_SOCKET_GROUP = SERVICE_USER


def virtiofsd_unit_name(name: str, tag: str) -> str:
    """The companion unit of share TAG of VM NAME (a tag has no ':': the split is clear)."""
    return f"{VIRTIOFSD_UNIT_PREFIX}{name}:{tag}{UNIT_SUFFIX}"


def virtiofsd_runtime_dir(name: str, tag: str) -> str:
    """The share's RuntimeDirectory= (relative to /run)."""
    return f"{VIRTIOFSD_RUNTIME}/{name}/{tag}"


def virtiofsd_socket(name: str, tag: str) -> Path:
    """virtiofsd's vhost-user socket (at most 106 bytes: names are at most 40, tags 36)."""
    return Path("/run") / virtiofsd_runtime_dir(name, tag) / "sock"


# -- what libvirt's embed driver keeps in the root -------------------------------------------


def qemu_pidfile(root: Path, name: str) -> Path:
    return root / "run" / "qemu" / f"{name}.pid"


def qemu_log(root: Path, name: str) -> Path:
    return root / "log" / "qemu" / f"{name}.log"


def capabilities_dir(cache: Path) -> Path:
    return cache / "qemu" / "capabilities"
