"""Snapshots of a VM: every writable disk (the Image= overlay included), NVRAM and TPM.

Decided (docs/DESIGN.md, Snapshots): **qcow2 internal snapshots plus a small
directory per snapshot in the state directory**. Each writable disk keeps the
snapshot inside itself (`qemu-img snapshot -c` while the VM is stopped; QEMU's
`blockdev-snapshot-internal-sync` through the runner while it runs), so no file
is ever renamed under the domain, no backing chain changes and an Image=
overlay stays the one file the domain names. Next to the disks:

    snapshots/SNAP/meta.json   name, time, consistency, the disks it holds
    snapshots/SNAP/nvram       a copy of the UEFI variable store (raw: no internal
                               snapshots), when the VM has one
    snapshots/SNAP/tpm/        a copy of the swtpm state (TPM=), when there is one

A snapshot directory is made as `snapshots/.SNAP.new` and renamed into place
only once every disk holds its snapshot: `list` never shows half of one, and a
failure (a full disk) removes what was made. A raw writable disk cannot hold a
snapshot: such a VM is refused with one line.

Consistency: "consistent" when the guest agent froze the file systems for the
moment of the snapshot, "crash-consistent" when the VM ran and no agent
answered, "stopped" when taken from a stopped VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qemu_unit import command, paths
from qemu_unit.errors import QemuUnitError
from qemu_unit.log import log as logger
from qemu_unit.vm import control

SNAPSHOTS = paths.SNAPSHOTS_DIR
META = paths.SAVED_META
NVRAM = "nvram"
TPM = "tpm"  # a copy of the swtpm state directory (TPM=)
AUTO_PREFIX = "auto-"  # SnapshotSchedule='s snapshots; only these are pruned
VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@:+-]{0,63}")


@dataclass(frozen=True)
class Snapshot:
    name: str
    created: float  # seconds since the epoch
    consistency: str  # consistent | crash-consistent | stopped
    disks: tuple[str, ...]
    nvram: bool
    tpm: bool = False  # records made before TPM= have none


@dataclass(frozen=True)
class Targets:
    """What a snapshot holds: the writable qcow2 disks and the NVRAM file of a domain."""

    disks: tuple[Path, ...]
    nvram: Path | None


def check_name(snap: str) -> str:
    if not _NAME.fullmatch(snap):
        raise QemuUnitError(f"invalid snapshot name {snap!r}: up to 64 of A-Z a-z 0-9 _ . @ : "
                            "+ -, not starting with . or -")
    return snap


def default_name(prefix: str = "") -> str:
    return prefix + time.strftime("%Y%m%d-%H%M%S")


def unused_name(state: Path, prefix: str = "") -> str:
    """PREFIX + the date and time, with -2, -3... when taken twice in a second."""
    base = default_name(prefix)
    taken = {s.name for s in read_all(state)}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def targets(xml: str) -> Targets:
    """The writable disks and the NVRAM of the domain XML (as rendered for the VM)."""
    root = ET.fromstring(xml)
    disks = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if path is None:
            raise QemuUnitError("snapshots need file disks: a writable disk of the VM is "
                                f"a {disk.get('type')} device")
        driver = disk.find("driver")
        fmt = driver.get("type") if driver is not None else None
        if fmt != "qcow2":
            raise QemuUnitError(f"snapshots need qcow2 disks: {path} is {fmt or 'raw'} "
                                "(convert it with qemu-img convert -O qcow2)")
        disks.append(Path(path))
    nvram = root.find("./os/nvram")
    text = (nvram.text or "").strip() if nvram is not None else ""
    return Targets(tuple(disks), Path(text) if text else None)


def _dir(state: Path) -> Path:
    return state / SNAPSHOTS


def read_all(state: Path) -> list[Snapshot]:
    """Every complete snapshot of the VM, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for d in _dir(state).iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                meta = json.loads((d / META).read_text())
                found.append(Snapshot(meta["name"], float(meta["created"]), meta["consistency"],
                                      tuple(meta["disks"]), bool(meta["nvram"]),
                                      bool(meta.get("tpm", False))))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return sorted(found, key=lambda s: (s.created, s.name))


def find(state: Path, snap: str) -> Snapshot:
    for s in read_all(state):
        if s.name == snap:
            return s
    raise QemuUnitError(f"no snapshot {snap!r} (qemu-unit snapshot list shows them)")


def qemu_img(*args: str) -> str:
    try:
        return command.run(["qemu-img", *args], f"qemu-img {args[0]}")
    except command.CommandError as e:
        raise QemuUnitError(f"qemu-img {args[0]} failed: {e.detail}") from None


def internal_names(disk: Path) -> list[str]:
    """The internal snapshots qcow2 DISK holds (qemu-img info)."""
    info = json.loads(qemu_img("info", "--output=json", "-U", "-f", "qcow2", os.fspath(disk)))
    return [s["name"] for s in info.get("snapshots", [])]


class Offline:
    """Disk operations on a stopped VM: qemu-img on the files."""

    consistency = "stopped"

    def freeze(self) -> bool:
        return True

    def thaw(self) -> None:
        pass

    def create(self, disk: Path, snap: str) -> None:
        qemu_img("snapshot", "-q", "-c", snap, os.fspath(disk))

    def delete(self, disk: Path, snap: str) -> None:
        qemu_img("snapshot", "-q", "-d", snap, os.fspath(disk))


@contextlib.contextmanager
def _frozen(ops: Offline) -> Iterator[bool]:
    frozen = ops.freeze()
    try:
        yield frozen
    finally:
        if frozen:
            ops.thaw()


def _copy_owned(src: Path, dest: Path, like: Path) -> None:
    """Copy SRC to DEST (fsynced); owned as LIKE is, when root copies for the VM's user."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    _own_like(dest, like)


def _copy_tree_owned(src: Path, dest: Path, like: Path) -> None:
    """Copy the directory SRC to DEST (files fsynced), owned as LIKE is."""
    dest.mkdir(mode=0o700)
    _own_like(dest, like)
    for item in sorted(src.iterdir()):
        if item.is_dir() and not item.is_symlink():
            _copy_tree_owned(item, dest / item.name, like)
        elif item.is_file() and not item.is_symlink():
            _copy_owned(item, dest / item.name, like)


def _own_like(path: Path, like: Path) -> None:
    if os.geteuid() == 0:
        st = like.stat()
        os.chown(path, st.st_uid, st.st_gid)


def create(state: Path, xml: str, snap: str, ops: Offline | None = None,
           log: Callable[[str], None] | None = None) -> Snapshot:
    """Take snapshot SNAP of every writable disk and the NVRAM; nothing left on failure."""
    ops = ops or Offline()
    check_name(snap)
    what = targets(xml)
    base = _dir(state)
    if (base / snap).exists():
        raise QemuUnitError(f"snapshot {snap!r} exists already")
    for disk in what.disks:
        if snap in internal_names(disk):
            raise QemuUnitError(f"{disk} already holds an internal snapshot {snap!r}")
    base.mkdir(mode=0o700, exist_ok=True)
    _own_like(base, state)
    partial = base / f".{snap}.new"
    shutil.rmtree(partial, ignore_errors=True)
    made: list[Path] = []
    try:
        partial.mkdir(mode=0o700)
        _own_like(partial, state)
        with _frozen(ops) as frozen:
            for disk in what.disks:
                ops.create(disk, snap)
                made.append(disk)
            if what.nvram is not None and what.nvram.exists():
                _copy_owned(what.nvram, partial / NVRAM, state)
            tpm = paths.tpm_state_dir(state)
            if tpm.is_dir():
                _copy_tree_owned(tpm, partial / TPM, state)
        consistency = ops.consistency if frozen else "crash-consistent"
        result = Snapshot(snap, time.time(), consistency,
                          tuple(map(os.fspath, what.disks)),
                          what.nvram is not None and what.nvram.exists(),
                          (partial / TPM).is_dir())
        meta = partial / META
        meta.write_text(json.dumps({"version": VERSION, **asdict(result)}, sort_keys=True)
                        + "\n")
        _own_like(meta, state)
        os.rename(partial, base / snap)
    except BaseException as e:
        for disk in made:
            with contextlib.suppress(QemuUnitError):
                ops.delete(disk, snap)
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError):
            raise QemuUnitError(f"snapshot {snap!r} failed: {e.filename or partial}: "
                                f"{e.strerror or e}") from None
        raise
    if log:
        log(f"Took snapshot {snap} ({consistency}) of {len(what.disks)} disk(s)"
            f"{' and the NVRAM' if result.nvram else ''}"
            f"{' and the TPM state' if result.tpm else ''}")
    return result


def bitmaps(disk: Path) -> list[str]:
    """The persistent dirty bitmaps qcow2 DISK holds (a backup checkpoint's each)."""
    info = json.loads(qemu_img("info", "--output=json", "-U", "-f", "qcow2", os.fspath(disk)))
    data = info.get("format-specific", {}).get("data", {})
    return [b["name"] for b in data.get("bitmaps", [])]


def drop_checkpoints(state: Path, disks: Iterable[Path]) -> list[str]:
    """Remove the backup checkpoints: their bitmaps from DISKS and their definitions from
    STATE. qcow2 refuses to apply an internal snapshot while a disk has dirty bitmaps,
    and a bitmap would not count what the revert changed: the next backup is full."""
    from qemu_unit.vm import backup

    names = set(backup.forget_all_checkpoints(state))
    for disk in disks:
        for name in bitmaps(disk):
            qemu_img("bitmap", "--remove", "-f", "qcow2", os.fspath(disk), name)
            names.add(name)
    return sorted(names)


def revert(state: Path, xml: str, snap: str) -> tuple[Snapshot, list[str]]:
    """Put every disk and the NVRAM back to SNAP (the VM must be stopped); the backup
    checkpoints dropped on the way (drop_checkpoints)."""
    found = find(state, snap)
    what = targets(xml)
    if sorted(found.disks) != sorted(map(os.fspath, what.disks)):
        raise QemuUnitError(f"snapshot {snap!r} holds {', '.join(found.disks) or 'no disk'}, "
                            f"but the VM's writable disks are now "
                            f"{', '.join(map(os.fspath, what.disks)) or 'none'}")
    for disk in what.disks:
        if snap not in internal_names(disk):
            raise QemuUnitError(f"{disk} no longer holds snapshot {snap!r}")
    dropped = drop_checkpoints(state, what.disks)
    for disk in what.disks:
        qemu_img("snapshot", "-q", "-a", snap, os.fspath(disk))
    if found.nvram and what.nvram is not None:
        tmp = what.nvram.with_name(what.nvram.name + ".revert")
        _copy_owned(_dir(state) / snap / NVRAM, tmp, state)
        os.replace(tmp, what.nvram)
    if found.tpm:
        tpm = paths.tpm_state_dir(state)
        tmp_tpm = tpm.with_name(tpm.name + ".revert")
        shutil.rmtree(tmp_tpm, ignore_errors=True)
        _copy_tree_owned(_dir(state) / snap / TPM, tmp_tpm, state)
        shutil.rmtree(tpm, ignore_errors=True)
        os.rename(tmp_tpm, tpm)
    return found, dropped


def delete(state: Path, xml: str, snap: str, ops: Offline | None = None) -> None:
    """Remove SNAP from every disk, then its directory."""
    ops = ops or Offline()
    find(state, snap)
    for disk in targets(xml).disks:
        if disk.exists() and snap in internal_names(disk):
            ops.delete(disk, snap)
    shutil.rmtree(_dir(state) / snap)


def prune(state: Path, xml: str, keep: int, ops: Offline | None = None) -> list[str]:
    """Delete the oldest scheduled snapshots beyond KEEP; the names deleted."""
    auto = [s for s in read_all(state) if s.name.startswith(AUTO_PREFIX)]
    gone = [s.name for s in auto[:max(0, len(auto) - keep)]] if keep > 0 else []
    for name in gone:
        delete(state, xml, name, ops)
    return gone


class Live(Offline):
    """The same on a running VM, from the runner: the guest agent freezes the file systems
    (fsFreeze) around QEMU's internal snapshot of each disk (QMP, through libvirt)."""

    consistency = "consistent"

    def __init__(self, dom: Any) -> None:
        self.dom = dom
        self._nodes: dict[str, str] | None = None

    def freeze(self) -> bool:
        import libvirt

        try:
            self.dom.fsFreeze()
        except libvirt.libvirtError:
            return False
        return True

    def thaw(self) -> None:
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            self.dom.fsThaw()

    def _qmp(self, command_: str, **arguments: Any) -> Any:
        import libvirt
        import libvirt_qemu

        request = json.dumps({"execute": command_, "arguments": arguments})
        try:
            answer = libvirt_qemu.qemuMonitorCommand(self.dom, request, 0)
        except libvirt.libvirtError as e:
            raise QemuUnitError(f"QEMU refused {command_}: {e.get_error_message() or e}") from None
        return json.loads(answer).get("return")

    def _node(self, disk: Path) -> str:
        if self._nodes is None:
            self._nodes = {}
            for block in self._qmp("query-block") or []:
                inserted = block.get("inserted") or {}
                if inserted.get("file") and inserted.get("node-name"):
                    self._nodes[inserted["file"]] = inserted["node-name"]
        try:
            return self._nodes[os.fspath(disk)]
        except KeyError:
            raise QemuUnitError(f"the running VM has no disk {disk}") from None

    def create(self, disk: Path, snap: str) -> None:
        self._qmp("blockdev-snapshot-internal-sync", device=self._node(disk), name=snap)

    def delete(self, disk: Path, snap: str) -> None:
        self._qmp("blockdev-snapshot-delete-internal-sync", device=self._node(disk), name=snap)


def _running(context: control.Context) -> Any:
    dom = context.domain()
    if dom is None:
        raise control.ControlError(f"VM {context.name} is not running", "not-running")
    return dom


@control.handler("snapshot-create")
def _create_op(context: control.Context, request: dict[str, Any],
               _conn: control.Connection) -> dict[str, Any]:
    dom = _running(context)
    state = paths.finalize_dirs(context.name).state
    try:
        # The VM's journal keeps a line of every snapshot taken while it ran.
        made = create(state, dom.XMLDesc(0), str(request.get("snapshot")), Live(dom),
                      log=logger.info)
    except QemuUnitError as e:
        raise control.ControlError(str(e)) from None
    return {"snapshot": asdict(made)}


@control.handler("snapshot-delete")
def _delete_op(context: control.Context, request: dict[str, Any],
               _conn: control.Connection) -> dict[str, Any]:
    dom = _running(context)
    state = paths.finalize_dirs(context.name).state
    try:
        if request.get("prune") is not None:
            gone = prune(state, dom.XMLDesc(0), int(request["prune"]), Live(dom))
        else:
            delete(state, dom.XMLDesc(0), str(request.get("snapshot")), Live(dom))
            gone = [str(request.get("snapshot"))]
    except (QemuUnitError, ValueError) as e:
        raise control.ControlError(str(e)) from None
    return {"deleted": gone}
