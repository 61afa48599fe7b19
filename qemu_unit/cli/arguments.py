"""The `qemu-unit` command line: the argparse parser, apart from the commands.

cli.py runs it; manpages.py renders qemu-unit(1) from it without importing cli
(cli -> install -> manpages would otherwise lead back to cli).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from qemu_unit.config.source import DEFAULT_PATH, PATH_ENV
from qemu_unit.paths import CONFIG_DIR

# argparse is imported by build_parser: the unit's `run` does without it (systemd_run).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

PROG = "qemu-unit"
DESCRIPTION = (
    "Run QEMU virtual machines as systemd units (qemu-run@NAME.service) through libvirt's "
    "embedded QEMU driver: no libvirtd, one private libvirt root per VM."
)


class _Unused:
    """Stands in for the parser of a command this run does not need: every call is
    accepted and ignored (add_argument, add_subparsers, add_parser, ...)."""

    def __getattr__(self, _name: str) -> Any:
        return self._ignore

    def _ignore(self, *_args: Any, **_kwargs: Any) -> Any:
        return self


class _Only:
    """The subcommands action, building the parser of ONLY and no other: argparse builds
    each parser in full (all of them took 7-11 ms at every start of the runner, most of it
    gettext looking for catalogs; bench/runner.py)."""

    def __init__(self, sub: Any, only: str) -> None:
        self.sub, self.only = sub, only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self.sub.add_parser(name, **kwargs) if name == self.only else _Unused()


# The top-level options as the unit's command lines may carry them (all store_true).
_UNIT_FLAGS = {"-v": "verbose", "--verbose": "verbose", "--user": "user"}
# The command lines systemd runs for a VM: ExecStart= and the root steps (register-machine
# at every start, guest-firewall before a user network's, note-stop at a save's stop).
# Each: its positional arguments (with their choices, if any) and the rest of what
# build_parser() gives it.
_UNIT_COMMANDS: dict[str, tuple[tuple[tuple[str, tuple[str, ...] | None], ...], dict[str, Any]]] = {
    "run": ((("name", None),), {"shutdown_timeout": None, "config_dir": None}),
    "register-machine": ((("name", None),), {}),
    "note-stop": ((("name", None),), {}),
    "guest-firewall": ((("action", ("start", "stop")), ("name", None)), {}),
}


def systemd_run(argv: Sequence[str]) -> argparse.Namespace | None:
    """ARGV as build_parser() reads it when it is one of the command lines systemd runs for
    a VM (`[-v|--verbose|--user]... run NAME`, the root steps); None for anything else
    (build_parser's to read). Importing argparse and building even one command's parser
    took ~4 ms of every start of the runner and of each root step."""
    index = next((i for i, word in enumerate(argv) if word not in _UNIT_FLAGS), len(argv))
    if index == len(argv) or argv[index] not in _UNIT_COMMANDS:
        return None
    positionals, rest = _UNIT_COMMANDS[argv[index]]
    values = argv[index + 1:]
    if len(values) != len(positionals):
        return None
    for value, (_, choices) in zip(values, positionals, strict=True):
        if value.startswith("-") or choices is not None and value not in choices:
            return None
    flags = {_UNIT_FLAGS[o] for o in argv[:index]}
    # The commands read attributes only: a SimpleNamespace does for argparse's.
    return SimpleNamespace(  # type: ignore[return-value]
        verbose="verbose" in flags, user="user" in flags, command=argv[index],
        **{name: value for value, (name, _) in zip(values, positionals, strict=True)}, **rest)


def command_of(argv: Sequence[str]) -> str | None:
    """The command ARGV names: its first word that is not an option (the top-level
    options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ONLY: just that command's parser (None: all, for --help,
    an unknown command and the man page)."""
    import argparse

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--user",
        action="store_true",
        help="the calling user's own VMs (qemu-run@NAME.service of systemctl --user; .vm "
        "files in $XDG_CONFIG_HOME/qemu-run, /etc/qemu-run/users/UID and /etc/qemu-run/users; "
        "state, logs and cache in the user's XDG directories), as systemctl --user; without "
        "it, the system's VMs (/etc/qemu-run), for every caller",
    )
    sub: Any = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if only is not None:
        sub = _Only(sub, only)

    def config_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config-dir",
            action="append",
            metavar="DIR",
            help="look for NAME.vm/NAME.xml in DIR instead of the search path "
            f"(repeatable; default: ${PATH_ENV} or {', '.join(map(str, DEFAULT_PATH))})",
        )

    p = sub.add_parser(
        "run",
        help="run the VM NAME in the foreground (the ExecStart of qemu-run@NAME.service)",
        description="Start the VM NAME through qemu:///embed, report readiness with sd_notify, "
        "forward its serial console to the journal (stderr outside systemd) and, on SIGTERM, "
        "SIGINT or SIGRTMIN+4, shut the guest down gracefully, destroying it after the "
        "shutdown timeout or on a second signal. Exits 0 when the guest powers off, 78 on a "
        "configuration error, 1 on any other failure.",
    )
    p.add_argument("name", metavar="NAME", help="the VM: NAME.vm or NAME.xml on the search path")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="override the VM's ShutdownTimeout= (default 60)",
    )
    config_dir(p)

    p = sub.add_parser(
        "console",
        help="attach this terminal to a running VM's serial console",
        description="Attach the terminal to the serial console of the running VM NAME, as "
        "virsh console does: what the guest prints appears here (and still goes to the "
        "journal and console.log as before), what is typed goes to the guest. Detach with "
        "Ctrl-]. Several terminals may attach at once. Allowed for root and the VM's own "
        "user (qemu-vm-NAME); a terminal that does not keep up with the guest is "
        "disconnected rather than slowing the guest down. Exits 0 on detach, 1 when the "
        "console closes (the VM stopped, or this client was cut off) or cannot be reached.",
    )
    p.add_argument("name", metavar="NAME", help="the VM, as in qemu-run@NAME.service")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="only watch: nothing typed reaches the guest",
    )

    p = sub.add_parser(
        "exec",
        help="run a command inside a running VM's guest (through its guest agent)",
        description="Run CMD with its ARGs in the guest of the running VM NAME through the QEMU "
        "guest agent (no network, no SSH): its stdout and stderr arrive here, each on ours, "
        "as the guest produces them; our stdin is passed to it when it is not a terminal "
        "(read whole first, at most 16 MiB; -n: none). The command runs as root from the "
        "agent's environment (PATH included), through /bin/sh in a session of its own; its "
        "output goes through two unlinked files in the guest's /tmp, so it is not a terminal "
        "or a pipe. Needs a guest agent channel (ShutdownMode=agent, Ready=agent or "
        "HealthCmd=) and qemu-guest-agent in the guest. Exits with CMD's exit status (a "
        "signal N: 128+N); 69 when the VM is not running, 75 when its agent does not answer, "
        "76 when an answer is malformed, 77 when permission is denied, 78 when the VM has no "
        "agent channel, 124 when --timeout ran out (the command is killed), 125 on any other "
        "failure of qemu-unit; 126/127 from the guest's shell when CMD cannot be run or is not "
        "found.",
    )
    p.add_argument("name", metavar="NAME", help="the VM, as in qemu-run@NAME.service")
    p.add_argument("argv", metavar="CMD", nargs=argparse.REMAINDER,
                   help="the command and its arguments: everything after NAME (options of "
                   "exec go before NAME, as with podman exec; a -- after NAME is dropped)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set an environment variable for CMD (repeatable)")
    # dest apart from the top-level --user (user mode), which it would overwrite.
    p.add_argument("-u", "--user", metavar="USER", dest="guest_user",
                   help="run CMD as USER: qemu-ga 7.2's guest-exec has no user field, so this "
                   "wraps CMD in 'runuser -u USER --' (util-linux, in the guest)")
    p.add_argument("-t", "--timeout", type=float, metavar="SECONDS",
                   help="kill CMD (its whole session) after SECONDS; exit 124")
    p.add_argument("-n", "--no-stdin", action="store_true",
                   help="do not pass our stdin even when it is not a terminal")

    p = sub.add_parser(
        "cp",
        help="copy files between this host and a running VM's guest",
        description="Copy SRC to DEST where exactly one of them is NAME:/PATH, a path in the "
        "guest of the running VM NAME (absolute). Through the guest agent's guest-file-* "
        "commands in 1 MiB pieces, any size; the permission bits are kept; a copy is written "
        "under a temporary name next to its target and renamed at the end, so a partial copy "
        "never has the final name. A DEST that is a directory receives SRC under its own "
        "name. -r copies directories (regular files and directories; other entries are "
        "skipped with a warning). Exits 0 on success, 1 when a path does not exist, 64 on "
        "wrong use, otherwise as qemu-unit exec does (69, 75-78, 125).",
    )
    p.add_argument("src", metavar="SRC", help="a local path or NAME:/PATH")
    p.add_argument("dest", metavar="DEST", help="a local path or NAME:/PATH")
    p.add_argument("-r", "--recursive", action="store_true", help="copy directories")

    p = sub.add_parser(
        "render",
        help="print the libvirt domain XML a VM produces",
        description="Print exactly the domain XML the runner would hand to libvirt for NAME, "
        "run as the current user (as root: the system directories of qemu-run@NAME.service), "
        "for .vm and .xml VMs alike. Accel=auto is resolved on this host.",
    )
    p.add_argument("name", metavar="NAME")
    config_dir(p)

    p = sub.add_parser(
        "validate",
        help="check .vm files without starting anything",
        description="Check each FILE (a path to a .vm file) or NAME (looked up on the search "
        "path) and report every problem with file, line and key. With no argument, every VM on "
        "the search path is checked. Exits 78 if any is invalid.",
    )
    p.add_argument("targets", nargs="*", metavar="FILE|NAME")
    config_dir(p)

    p = sub.add_parser(
        "list",
        help="list every VM on the search path, running or not",
        description="One line per VM on the search path, running or not: whether it is "
        "enabled, its unit's state and sub-state, main PID, since when, the accelerator "
        "(the one in use while it runs, else Accel=), memory, CPUs, published ports, source "
        "file and the runner's STATUS= text; a VM that is masked or whose configuration "
        "cannot be read is listed with the reason. State comes from systemd and from the "
        "status file each runner keeps in /run/qemu-run/NAME (readable by root and qemu-run). "
        "With --json, a stable document described by qemu-unit.schema.json "
        "(/usr/share/doc/qemu-unit/): {\"version\": 1, \"vms\": [...]}.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    config_dir(p)

    p = sub.add_parser(
        "status",
        help="show one VM in detail, with its last console lines",
        description="What list shows for the VM NAME, plus its UUID, QEMU's PID, drop-ins and "
        "the last lines its guest printed on the serial console (from the journal). With "
        "--json: {\"version\": 1, \"vm\": {...}, \"console\": [...]}. Exits 78 when no VM "
        "NAME exists.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "-n", "--lines", type=int, default=10, metavar="N", help="console lines to show (10)"
    )
    config_dir(p)

    p = sub.add_parser(
        "register-machine",
        help="register the running VM NAME with systemd-machined (the unit does this)",
        description="Register the VM NAME, whose runner is $MAINPID, with systemd-machined as "
        "a machine of class vm, so that machinectl list, status and poweroff see it. "
        "Once qemu-run@NAME is active, qemu-run-register@NAME.service registers it as root "
        "(machined accepts registrations from root only) with one busctl call, and runs "
        "this, with $MAINPID the VM unit's, when machined refuses it (a registration left "
        "by the unit's last runner is replaced here); the runner itself stays "
        "unprivileged. Never fails: "
        "a VM that cannot be registered still runs, and a warning says why.",
    )
    p.add_argument("name", metavar="NAME")

    p = sub.add_parser(
        "guest-firewall",
        help="load or remove the guest firewall of NAME (the unit does this)",
        description="start: load the nftables table inet qemu-run-NAME, which refuses new "
        "connections from the calling process's cgroup (the VM's unit) to every address of "
        "the host (with $QEMU_UNIT_HOST_ACCESS=loopback: to every address but 127.0.0.0/8 "
        "and ::1), then check from that cgroup that such a connection is refused; fails "
        "if either does not work. stop: remove the table. qemu-run@.service runs these as "
        "root in ExecStartPre=+ and ExecStopPost=-+ for VMs on a user network "
        "(AllowHostLoopback= in qemu-run.vm(5)).",
    )
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("name", metavar="NAME")

    sub.add_parser(
        "prepare-caps",
        help="probe QEMU's capabilities once for every VM (qemu-unit-caps.service does this)",
        description="Make the shared QEMU capability cache (/var/cache/qemu-run) current, "
        "probing QEMU when it is cold or stale, and readable by every VM's user. "
        "qemu-unit-caps.service runs this as the user qemu-run before the first VM starts; "
        "each VM copies the cache into its own state directory and never writes the shared "
        "one.",
    )

    p = sub.add_parser(
        "note-stop",
        help="note for the runner of NAME whether the host is going down (the unit does this)",
        description="Ask systemd for its state (\"stopping\" while the host shuts down or "
        "reboots) and leave the answer in the runtime directory of the VM NAME, where its "
        "runner looks on SIGTERM: HostShutdown=save saves only when the host goes down. "
        "qemu-run@.service runs this as root in ExecStop=+ (systemd's private socket is "
        "root's), before the runner is signalled. Never fails.",
    )
    p.add_argument("name", metavar="NAME")

    p = sub.add_parser(
        "reset",
        help="discard a VM's overlay and NVRAM: its next start is a first boot",
        description="Remove the qcow2 overlay over Image= (and a UEFI VM's NVRAM, and a "
        "saved state) from NAME's state directory, so that the next start boots the base "
        "image afresh (cloud-init runs again). Refuses while the VM runs. The base image is "
        "not touched.",
    )
    p.add_argument("name", metavar="NAME")

    p = sub.add_parser(
        "backup",
        help="add a backup of VM NAME (running or stopped) to DIR: full, then incremental",
        description="Copy every writable disk of the VM NAME, its .vm file, its UEFI NVRAM "
        "and its TPM state into a new point in DIR, with a manifest of sha256 checksums. The "
        "first point is full; later ones into the same DIR hold only what the guest wrote "
        "since the last one (libvirt's backup API with checkpoints; the VM must run: a "
        "stopped VM gets a full point each time). A running VM's backup is consistent when "
        "the guest agent froze its file systems for it, else crash-consistent; its full "
        "point holds the whole disk as the guest sees it (an Image= base included). A "
        "stopped VM's point holds only the overlay's difference against an Image= base, "
        "named by its sha256, which a restore needs, unless --standalone flattens the base "
        "in. A failure (a full disk) leaves "
        "the VM running and nothing under a final name in DIR. Exits 0 when the point is "
        "complete.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("dir", metavar="DIR", type=Path, nargs="?",
                   help="the backup directory (with --scheduled: BackupTo=)")
    p.add_argument("--scheduled", action="store_true",
                   help="the VM's BackupSchedule= backup (its timer's qemu-run-backup@ "
                   "unit): into BackupTo=, then --keep BackupKeep=")
    p.add_argument("--standalone", action="store_true",
                   help="a stopped VM's point holds the Image= base too (flattened): "
                   "restorable without it (a running VM's full point always does)")
    p.add_argument("--full", action="store_true",
                   help="a full point even when an incremental one is possible")
    p.add_argument("--keep", type=int, default=0, metavar="N",
                   help="then remove the points the last N do not need (a new chain is "
                   "started once the last one has N points); 0 keeps all")
    config_dir(p)

    p = sub.add_parser(
        "restore",
        help="rebuild a VM from backup directory DIR, on this host or another",
        description="Check the checksums of every file the point needs (a corrupted backup "
        "is refused and nothing is written), then write the VM's .vm into /etc/qemu-run, its "
        "disks, NVRAM and TPM state into its state directory. An Image= base must be on "
        "this host with the sha256 the backup recorded, unless the backup was --standalone "
        "(the VM then boots from its own copy, base.qcow2 in its state directory). Never "
        "overwrites a .vm or a disk. Run systemctl daemon-reload, then start the VM.",
    )
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("--as", dest="as_name", metavar="NEWNAME",
                   help="restore as VM NEWNAME (default: the name it was backed up as)")
    p.add_argument("--point", metavar="ID", help="restore point ID (default: the last)")
    p.add_argument("--list", action="store_true",
                   help="list DIR's points instead of restoring")

    p = sub.add_parser(
        "kube",
        help="hand a VM to KubeVirt (generate) or take one back (play)",
        description="Convert between a .vm file and KubeVirt, as podman kube generate/play "
        "do for containers. Whatever one side cannot express is named on stderr, one line "
        "each; with --strict that is an error (exit status 65) and nothing is written.",
    )
    kube = p.add_subparsers(dest="kube_command", metavar="VERB", required=True)
    k = kube.add_parser(
        "generate",
        help="print a KubeVirt VirtualMachine (YAML) for the VM NAME",
        description="Print YAML for the VM NAME: a kubevirt.io/v1 VirtualMachine (CPUs, "
        "memory, machine, firmware, UUID, disks, interfaces with their MAC addresses, "
        "runStrategy from [Install] and Restart=), a Secret with its SSH keys (given to "
        "cloud-init by noCloud) and one with SetCredential= values, and a ClusterIP Service "
        "per PublishPort=. Image= becomes a containerDisk named by --image-ref with "
        "Ephemeral=yes, else a DataVolume imported from that container image (a persistent "
        "disk, as the overlay is); Disk=...,format=raw and CDROM= become hostDisks; "
        "UserData= and NetworkConfig= go into cloudInitNoCloud.",
    )
    k.add_argument("name", metavar="NAME")
    k.add_argument(
        "--image-ref",
        metavar="REF",
        help="a container image holding Image= as a containerDisk (the image file in /disk/)",
    )
    k.add_argument("--strict", action="store_true",
                   help="fail (exit 65) when something cannot be expressed")
    config_dir(k)
    k = kube.add_parser(
        "play",
        help="write the .vm (and seed files) for a KubeVirt VirtualMachine",
        description="Read YAML (FILE, or - for stdin) holding one kubevirt.io/v1 "
        "VirtualMachine, with the Secrets and Services qemu-unit kube generate writes, and "
        "write NAME.vm plus its cloud-init files (NAME.user-data, NAME.network-config) into "
        "DIR. Every field that has no .vm counterpart is named on stderr. Refuses to "
        "overwrite an existing NAME.vm.",
    )
    k.add_argument("file", metavar="FILE")
    k.add_argument("--dir", metavar="DIR",
                   help="where to write (default: the first directory of the search path)")
    k.add_argument("--strict", action="store_true",
                   help="fail (exit 65) when something cannot be expressed; write nothing")

    p = sub.add_parser(
        "image",
        help="pull, list, prune or remove images in the shared image cache",
        description="The image cache Image= URLs are pulled into (/var/lib/qemu-run/images "
        "as root, ~/.local/state/qemu-run/images otherwise, or $QEMU_UNIT_IMAGES): one "
        "read-only file per image, named by its sha256 digest, written only once its digest "
        "matched what vouched for it.",
    )
    verbs = p.add_subparsers(dest="image_command", metavar="VERB", required=True)
    q = verbs.add_parser(
        "pull",
        help="download, decompress and verify an image into the cache",
        description="Download URL (https://, http:// or file://) into the image cache, "
        "resuming a partial download (HTTP Range) and retrying server errors with backoff, "
        "decompressing .xz, .gz and .zst on the way, and keep it only if its digest matches "
        "--checksum or its entry in --checksums (whose --signature gpgv checks against "
        "--keyring). Prints the cached file's path. A progress bar on a terminal; STATUS= "
        "under systemd (qemu-run-pull@.service runs this).",
    )
    q.add_argument("url", metavar="URL")
    q.add_argument("--checksum", metavar="ALGO:HEX", help="sha256:HEX or sha512:HEX")
    q.add_argument("--checksums", metavar="URL", help="a SHA256SUMS/SHA512SUMS file")
    q.add_argument("--signature", metavar="URL", help="detached signature of --checksums")
    q.add_argument("--keyring", metavar="PATH", help="keys gpgv checks the signature against")
    q.add_argument("--no-verify", action="store_true", help="keep the image unverified")
    q.add_argument("--update", action="store_true",
                   help="re-read the sums and pull again if they name another image")
    q.add_argument("--key", metavar="KEY", help=argparse.SUPPRESS)
    q = verbs.add_parser(
        "list",
        help="list the cached images, their sources and the VMs using them",
        description="One line per cached image: digest, size, the VMs that use it (by their "
        "Image= URL or path, or through a kept overlay) and the URLs it was pulled from.",
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    config_dir(q)
    q = verbs.add_parser(
        "prune",
        help="remove every cached image no VM uses",
        description="Remove the images no VM on the search path uses: not its Image= "
        "source's current image, not the base of its kept overlay.",
    )
    q.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    config_dir(q)
    q = verbs.add_parser(
        "rm",
        help="remove cached images by digest or URL",
        description="Remove each IMAGE (a digest, a unique prefix of one, or the URL it was "
        "pulled from). Refuses images a VM uses unless --force.",
    )
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("--force", action="store_true", help="remove images VMs use too")
    config_dir(q)

    p = sub.add_parser(
        "auto-update",
        help="move AutoUpdate= VMs to the image their sums name now, roll back on failure",
        description="For each image source that VMs with AutoUpdate=yes|reset use: re-read "
        "ImageChecksums= (and check its signature); if it names another image, pull it as "
        "the pull user and restart the source's running VMs on it (reset: discard the "
        "overlay first). A VM that does not become ready within its start timeout sends the "
        "source back to its previous image, and its VMs are restarted on that. "
        "qemu-unit-auto-update.timer runs this daily. Exits 1 when a source was rolled back "
        "or could not be checked.",
    )
    p.add_argument("--dry-run", action="store_true",
                   help="only say which VMs would move to which image (reads the sums)")
    config_dir(p)

    p = sub.add_parser(
        "save",
        help="save the running VM NAME into its state directory and stop it",
        description="Save the running VM NAME (libvirt's save: the guest's memory and device "
        "state) into saved/ in its state directory and stop its unit, without the guest "
        "noticing; its next start restores it, processes and all, as HostShutdown=save does "
        "at a host shutdown. Waits until the runner has finished. Exits 0 once saved, 69 when "
        "the VM does not run, 125 when the save failed (the VM then runs on: a full disk, "
        "see the journal).",
    )
    p.add_argument("name", metavar="NAME")

    p = sub.add_parser(
        "snapshot",
        help="take, list, revert to and delete snapshots of a VM's disks and NVRAM",
        description="Snapshots hold every writable disk of the VM (the Image= overlay "
        "included, as qcow2 internal snapshots: writable disks must be qcow2) and a copy of "
        "its UEFI variable store, with a record in snapshots/ of the state directory. Taken "
        "from a running VM through its runner, consistent when the guest agent froze the "
        "file systems for it, else crash-consistent; from a stopped VM with qemu-img.",
    )
    snap = p.add_subparsers(dest="snapshot_command", metavar="VERB", required=True)
    s = snap.add_parser("create", help="take a snapshot (named by the time unless SNAP)",
                        description="Take snapshot SNAP (default: the date and time) of the "
                        "VM NAME, running or stopped. With --scheduled (the timer of "
                        "SnapshotSchedule=) it is named auto-DATE-TIME and the oldest auto- "
                        "snapshots beyond SnapshotKeep= are deleted.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("snapshot", metavar="SNAP", nargs="?")
    s.add_argument("--scheduled", action="store_true",
                   help="named auto-..., then prune to SnapshotKeep=")
    config_dir(s)
    s = snap.add_parser("list", help="list the snapshots of a VM, oldest first")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true", help="print JSON: a list of snapshots")
    s = snap.add_parser("revert", help="put the stopped VM's disks and NVRAM back to SNAP",
                        description="Revert every writable disk and the NVRAM of the stopped "
                        "VM NAME to snapshot SNAP; what was written since is lost. Refuses "
                        "while the VM runs.")
    s.add_argument("name", metavar="NAME")
    s.add_argument("snapshot", metavar="SNAP")
    config_dir(s)
    s = snap.add_parser("delete", help="delete snapshot SNAP (VM running or stopped)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("snapshot", metavar="SNAP")
    config_dir(s)

    p = sub.add_parser(
        "discard-save",
        help="drop the saved state of the stopped VM NAME: its next start boots afresh",
        description="Remove the saved state (saved/ in the state directory) of the VM NAME, "
        "made by qemu-unit save or HostShutdown=save, for example after a start refused it "
        "because the VM's definition or base image changed or its checksum failed. The "
        "guest's memory in it is lost; its next start boots from the disks. Refuses while "
        "the VM runs.",
    )
    p.add_argument("name", metavar="NAME")

    for verb, what in (("install", "install"), ("uninstall", "remove")):
        p = sub.add_parser(
            verb,
            help=f"{what} the template unit, generator, sysusers.d and tmpfiles.d entries",
            description=f"{what.capitalize()} qemu-run@.service (ExecStart resolved to this "
            "installation), the systemd generator, the qemu-run user (sysusers.d), "
            "tmpfiles.d and man pages. Reloads systemd when it runs.",
        )
        p.add_argument(
            "--root", metavar="DIR", default="/", help="operate on the tree under DIR (default /)"
        )
        p.add_argument(
            "--prefix",
            metavar="DIR",
            default="/usr/local",
            help="where the files go: DIR/lib/systemd/system etc. (default /usr/local)",
        )
        p.add_argument(
            "--no-reload", action="store_true", help="do not run systemctl daemon-reload"
        )

    p = sub.add_parser(
        "demo",
        help="build a tiny demo guest from distribution packages and write demo.vm",
        description="Build a kernel + busybox guest from Debian's own packages (no image "
        "download) and write demo.vm into the first configuration directory, so that "
        "'systemctl start qemu-run@demo' works; with --run, also run it in the foreground.",
    )
    p.add_argument(
        "--config-dir", metavar="DIR", default=str(CONFIG_DIR), help="where to write demo.vm"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default="/var/lib/qemu-unit/demo",
        help="where the guest's kernel and initrd go",
    )
    p.add_argument(
        "--run",
        action="store_true",
        help="run the demo VM in the foreground after building it",
    )
    p.add_argument(
        "--image",
        metavar="PATH",
        help="instead, write cloud.vm: this cloud image (qcow2/raw, e.g. Debian's "
        "genericcloud) as a service, configured by cloud-init, SSH on 127.0.0.1:2222",
    )
    p.add_argument(
        "--ssh-key",
        metavar="FILE",
        help="with --image: the public key to install (default: ~/.ssh/id_ed25519.pub, "
        "id_ecdsa.pub or id_rsa.pub)",
    )
    p.add_argument(
        "--run-for",
        type=int,
        metavar="SECONDS",
        help="make the guest power itself off after SECONDS (implies --run)",
    )
    return parser
