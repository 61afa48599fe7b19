"""Backups of a VM into a directory (issue 16): a full point first, then points holding
only what changed since, each with checksums, restorable on any host.

A backup directory DIR holds:

    manifest.json     every point: its parent, time, consistency, checkpoint, and each
                      file with its size and sha256 (replaced whole, never edited)
    ID/vm             the .vm file as it was, its drop-ins appended
    ID/DEV.qcow2      each writable disk (DEV: its target, vda...); the first point is
                      full, a later one holds only the clusters written since its
                      parent and names the parent's file as its qcow2 backing file
    ID/nvram          the UEFI variable store, when the VM has one
    ID/tpm.tar        swtpm's state (STATE/lib/swtpm), when the VM has a TPM

A point is written into DIR/.ID.partial and renamed to DIR/ID once every file is
complete and summed; only then is the manifest replaced (write, fsync, rename). A
failure (a full disk) removes the partial directory: no half-written file is ever
under a final name, and the manifest never names a file that is not whole.

Live backups use libvirt's backup API in push mode: QEMU writes each disk into a
qcow2 file the CLI made (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL), and a checkpoint
(a persistent dirty bitmap in the disk's qcow2) marks the moment, so the next point
copies only the clusters written since. The embed root is wiped at every stop: the
checkpoint's definition is kept in STATE/checkpoints and given back to libvirt at the
next start (VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE; the bitmap itself lives in the
overlay). A checkpoint libvirt no longer has (a crash left the bitmap inconsistent)
makes the next point a full one, with one line saying why.

Only the runner holds the embed connection, so the backup job runs in the runner
(the "backup" control op); the directory is written by the CLI (root), never by the
VM's user: the partial directory is lent to the VM's user while QEMU writes into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu_unit import paths
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import control

VERSION = 1
# How often the runner reports the job's progress to the client.
PROGRESS_SECONDS = 1.0
_ID = re.compile(r"[0-9]{8}-[0-9]{6}(-[0-9]{1,3})?")
_DEV = re.compile(r"[a-z]{2,3}[a-z0-9]{1,4}")


class CorruptBackup(QemuUnitError):
    """A backup file that does not match its manifest: never used."""


@dataclass(frozen=True)
class File:
    """One file of a point, relative to the backup directory."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DiskCopy:
    """A writable disk of the VM in a point."""

    target: str  # vda...
    source: str  # its path on the host it was taken from
    image: bool  # the Image= overlay (restored over the base), else a Disk=
    format: str  # the source's format (a Disk= is restored in it)
    file: File


@dataclass(frozen=True)
class Base:
    """The Image= base a point's image disk is a difference against (not --standalone)."""

    path: str
    format: str
    sha256: str


@dataclass(frozen=True)
class Point:
    id: str
    parent: str | None  # None: a full point
    created: float
    consistency: str  # consistent | crash-consistent | stopped
    checkpoint: str | None  # the libvirt checkpoint it ends at (None: taken while stopped)
    standalone: bool
    base: Base | None
    vm: File
    disks: tuple[DiskCopy, ...]
    nvram: File | None = None
    tpm: File | None = None

    def files(self) -> list[File]:
        return [self.vm, *(d.file for d in self.disks),
                *(f for f in (self.nvram, self.tpm) if f is not None)]


@dataclass(frozen=True)
class Manifest:
    name: str  # the VM's name
    points: tuple[Point, ...] = field(default=())

    def find(self, point_id: str | None) -> Point:
        if not self.points:
            raise QemuUnitError("the backup holds no point")
        if point_id is None:
            return self.points[-1]
        for p in self.points:
            if p.id == point_id:
                return p
        raise QemuUnitError(f"no point {point_id!r} in the backup (there are: "
                            f"{', '.join(p.id for p in self.points)})")

    def chain(self, point_id: str | None) -> list[Point]:
        """The points a restore of POINT_ID reads: its full point first, POINT_ID last."""
        point = self.find(point_id)
        chain = [point]
        while chain[-1].parent is not None:
            if len(chain) > len(self.points):
                raise CorruptBackup("the manifest's points form a loop")
            chain.append(self.find(chain[-1].parent))
        return chain[::-1]


# -- the manifest ----------------------------------------------------------------------------


def _file(value: Any) -> File:
    return File(str(value["path"]), int(value["size"]), str(value["sha256"]))


def _opt_file(value: Any) -> File | None:
    return None if value is None else _file(value)


def _point(value: dict[str, Any]) -> Point:
    base = value.get("base")
    point = Point(
        id=str(value["id"]),
        parent=None if value.get("parent") is None else str(value["parent"]),
        created=float(value["created"]),
        consistency=str(value["consistency"]),
        checkpoint=None if value.get("checkpoint") is None else str(value["checkpoint"]),
        standalone=bool(value["standalone"]),
        base=None if base is None else Base(str(base["path"]), str(base["format"]),
                                            str(base["sha256"])),
        vm=_file(value["vm"]),
        disks=tuple(DiskCopy(str(d["target"]), str(d["source"]), bool(d["image"]),
                             str(d["format"]), _file(d["file"])) for d in value["disks"]),
        nvram=_opt_file(value.get("nvram")),
        tpm=_opt_file(value.get("tpm")),
    )
    if not _ID.fullmatch(point.id):
        raise ValueError(f"invalid point id {point.id!r}")
    for f in point.files():
        parts = Path(f.path).parts
        if len(parts) != 2 or parts[0] != point.id or parts[1] in ("..", "."):
            raise ValueError(f"{f.path} is not a file of point {point.id}")
    return point


def manifest_path(directory: Path) -> Path:
    return directory / paths.BACKUP_MANIFEST


def read_manifest(directory: Path) -> Manifest | None:
    """DIRECTORY's manifest; None when there is none yet; CorruptBackup when unreadable."""
    path = manifest_path(directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise QemuUnitError(f"{path}: {e.strerror}") from None
    try:
        value = json.loads(text)
        if value.get("version") != VERSION:
            raise ValueError(f"version {value.get('version')!r}, expected {VERSION}")
        return Manifest(str(value["name"]), tuple(_point(p) for p in value["points"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptBackup(f"{path}: not a backup manifest ({e})") from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Replace the manifest whole: a reader sees the old one or the new one."""
    path = manifest_path(directory)
    tmp = path.with_name(path.name + ".new")
    text = json.dumps({"version": VERSION, "name": manifest.name,
                       "points": [asdict(p) for p in manifest.points]}, indent=1) + "\n"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_id(manifest: Manifest | None, now: float | None = None) -> str:
    """The date and time (UTC), with -2, -3... when a point of that second exists."""
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    taken = {p.id for p in manifest.points} if manifest else set()
    point_id, n = base, 1
    while point_id in taken:
        n += 1
        point_id = f"{base}-{n}"
    return point_id


def checkpoint_name(directory: Path, point_id: str) -> str:
    """The checkpoint a point of DIRECTORY ends at: unique per directory and point."""
    tag = hashlib.sha256(os.fsencode(directory.resolve())).hexdigest()[:8]
    return f"backup-{tag}-{point_id}"


def needed(manifest: Manifest, keep: int) -> set[str]:
    """The points that the last KEEP points need (themselves and their parents)."""
    out: set[str] = set()
    for point in manifest.points[-keep:] if keep > 0 else manifest.points:
        out.update(p.id for p in manifest.chain(point.id))
    return out


def prune(manifest: Manifest, keep: int) -> tuple[Manifest, list[str]]:
    """BackupKeep=: the manifest without the points the last KEEP do not need, and the
    ids removed. A chain goes as a whole once KEEP newer points stand on another one
    (see chain_full)."""
    if keep <= 0:
        return manifest, []
    kept = needed(manifest, keep)
    gone = [p.id for p in manifest.points if p.id not in kept]
    return replace(manifest, points=tuple(p for p in manifest.points if p.id in kept)), gone


def chain_full(manifest: Manifest, keep: int) -> bool:
    """Whether the next point should start a new chain so that pruning to KEEP can drop
    the old one: the last chain already has KEEP points."""
    if keep <= 0 or not manifest.points:
        return False
    return len(manifest.chain(None)) >= keep


# -- checksums -------------------------------------------------------------------------------


def sha256_file(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def describe(directory: Path, path: Path) -> File:
    """The File entry of PATH (inside DIRECTORY), made durable on the way (fsync)."""
    return File(os.fspath(path.relative_to(directory)), path.stat().st_size,
                sha256_file(path, fsync=True))


def verify(directory: Path, points: list[Point],
           progress: Callable[[str], None] | None = None) -> None:
    """Every file of POINTS is there with its size and checksum; CorruptBackup otherwise."""
    for point in points:
        for f in point.files():
            path = directory / f.path
            if progress:
                progress(f.path)
            try:
                size = path.stat().st_size
                ok = size == f.size and sha256_file(path) == f.sha256
            except FileNotFoundError:
                raise CorruptBackup(f"{path} is missing: the backup cannot be used") from None
            if not ok:
                raise CorruptBackup(f"{path} does not match its checksum in the manifest "
                                    "(corrupted): the backup is not used")


# -- what a domain holds ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A writable disk of the domain: its target, file and format."""

    target: str
    path: Path
    format: str


def writable_disks(xml: str) -> list[Source]:
    """The writable file disks of the domain XML, in its order."""
    found = []
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
        path = source.get("file") if source is not None else None
        dev = target.get("dev") if target is not None else None
        if path is None or dev is None or not _DEV.fullmatch(dev):
            raise QemuUnitError("backups need file disks: a writable disk of the VM is a "
                                f"{disk.get('type')} device")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        found.append(Source(dev, Path(path), fmt))
    return found


def nvram_path(xml: str) -> Path | None:
    node = ET.fromstring(xml).find("./os/nvram")
    text = (node.text or "").strip() if node is not None else ""
    return Path(text) if text else None


# -- the runner's side: the backup job and its checkpoints -----------------------------------


def _definition(xml: str) -> str:
    """A checkpoint's XML without its <domain> copy: a redefinition then fits the
    domain of any later start (the domain's UUID may change)."""
    root = ET.fromstring(xml)
    for node in root.findall("domain"):
        root.remove(node)
    return ET.tostring(root, encoding="unicode")


def keep_checkpoint(state: Path, name: str, xml: str) -> None:
    directory = paths.checkpoints_dir(state)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}.xml"
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(_definition(xml))
    os.replace(tmp, path)


def save_checkpoints(dom: Any, state: Path) -> None:
    """Keep the definitions of every checkpoint libvirt holds now, with their parents as
    libvirt has them now (deleting a checkpoint re-parents its child), and none other."""
    names = set()
    for checkpoint in dom.listAllCheckpoints(0):
        keep_checkpoint(state, checkpoint.getName(), checkpoint.getXMLDesc(0))
        names.add(checkpoint.getName())
    with contextlib.suppress(FileNotFoundError):
        for path in paths.checkpoints_dir(state).glob("*.xml"):
            if path.name.removesuffix(".xml") not in names:
                path.unlink()


def forget_checkpoint(state: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (paths.checkpoints_dir(state) / f"{name}.xml").unlink()


def forget_all_checkpoints(state: Path) -> list[str]:
    """Drop every kept checkpoint definition (the disks' data changed outside QEMU: a
    snapshot revert, a reset); the manifest's next point is then a full one. The names."""
    directory = paths.checkpoints_dir(state)
    gone = sorted(p.name.removesuffix(".xml") for p in directory.glob("*.xml"))
    shutil.rmtree(directory, ignore_errors=True)
    return gone


def _creation(path: Path) -> tuple[int, str]:
    try:
        node = ET.parse(path).getroot().find("creationTime")
        return (int(node.text or 0) if node is not None else 0, path.name)
    except (OSError, ET.ParseError, ValueError):
        return (0, path.name)


def redefine_checkpoints(dom: Any, state: Path, warn: Callable[[str], None]) -> list[str]:
    """Give libvirt back the checkpoints kept in STATE (oldest first); one that no longer
    fits (its bitmap is gone or inconsistent after a crash) is dropped, with a warning:
    the next backup is then a full one. The names given back."""
    import libvirt

    directory = paths.checkpoints_dir(state)
    if not directory.is_dir():
        return []
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | getattr(
        libvirt, "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE", 0)
    done = []
    for path in sorted(directory.glob("*.xml"), key=_creation):
        name = path.name.removesuffix(".xml")
        try:
            dom.checkpointCreateXML(path.read_text(), flags)
            done.append(name)
        except (libvirt.libvirtError, OSError) as e:
            warn(f"Dropped backup checkpoint {name} ({e}): the next backup is a full one")
            path.unlink(missing_ok=True)
    return done


def backup_xml(targets: dict[str, str], incremental: str | None) -> str:
    root = ET.Element("domainbackup", mode="push")
    if incremental:
        ET.SubElement(root, "incremental").text = incremental
    disks = ET.SubElement(root, "disks")
    for dev, path in targets.items():
        disk = ET.SubElement(disks, "disk", name=dev, type="file")
        ET.SubElement(disk, "driver", type="qcow2")
        ET.SubElement(disk, "target", file=path)
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, devs: list[str]) -> str:
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    for dev in devs:
        ET.SubElement(disks, "disk", name=dev, checkpoint="bitmap")
    return ET.tostring(root, encoding="unicode")


def _running(context: control.Context) -> Any:
    dom = context.domain()
    if dom is None:
        raise control.ControlError(f"VM {context.name} is not running", "not-running")
    return dom


def _freeze(dom: Any) -> bool:
    import libvirt

    try:
        dom.fsFreeze()
    except libvirt.libvirtError:
        return False
    return True


def _thaw(dom: Any) -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        dom.fsThaw()


def _wait_job(dom: Any, conn: control.Connection) -> dict[str, Any]:
    """Follow the backup job to its end, reporting progress; its completed statistics."""
    import libvirt

    last = 0.0
    while True:
        stats = dom.jobStats(0)
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            break
        if conn.client_gone():
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            raise control.ControlError("the client went away: backup aborted", "aborted")
        if time.monotonic() - last >= PROGRESS_SECONDS:
            last = time.monotonic()
            conn.send({"progress": {"done": int(stats.get("disk_processed", 0)),
                                    "total": int(stats.get("disk_total", 0))}})
        time.sleep(0.1)
    try:
        completed: dict[str, Any] = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        completed = {}
    return completed


@control.handler("backup")
def _backup_op(context: control.Context, request: dict[str, Any],
               conn: control.Connection) -> dict[str, Any]:
    """Run one push-mode backup job into the files the client made (REQUEST["targets"]:
    {DEV: path}), from checkpoint REQUEST["incremental"] when given, ending at a new
    checkpoint REQUEST["checkpoint"], kept in the state directory."""
    import libvirt

    dom = _running(context)
    targets = request.get("targets")
    name = request.get("checkpoint")
    incremental = request.get("incremental")
    if (not isinstance(targets, dict) or not targets or not isinstance(name, str)
            or not all(isinstance(k, str) and isinstance(v, str) and _DEV.fullmatch(k)
                       for k, v in targets.items())
            or not (incremental is None or isinstance(incremental, str))):
        raise control.ControlError("a backup request needs targets and a checkpoint", "usage")
    state = paths.finalize_dirs(context.name).state
    if incremental is not None:
        known = {c.getName() for c in dom.listAllCheckpoints(0)}
        if incremental not in known:
            raise control.ControlError(f"the VM has no checkpoint {incremental}",
                                       "no-checkpoint")
    frozen = _freeze(dom)
    try:
        dom.backupBegin(backup_xml(targets, incremental), checkpoint_xml(name, list(targets)),
                        libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
    except libvirt.libvirtError as e:
        raise control.ControlError(f"libvirt refused the backup: {e.get_error_message()}"
                                   ) from None
    finally:
        # The job's point in time is its start: the guest runs on while it copies.
        if frozen:
            _thaw(dom)
    try:
        completed = _wait_job(dom, conn)
        finished = (completed.get("success") is True
                    or completed.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED)
        if not finished or completed.get("errmsg"):
            raise control.ControlError(f"the backup job failed: "
                                       f"{completed.get('errmsg') or 'see the journal'}")
        dom.checkpointLookupByName(name, 0)
        save_checkpoints(dom, state)
    except BaseException:
        drop_checkpoint(dom, state, name)
        raise
    return {"consistency": "consistent" if frozen else "crash-consistent",
            "checkpoint": name, "bytes": int(completed.get("disk_processed", 0))}


def drop_checkpoint(dom: Any, state: Path, name: str) -> None:
    """Delete checkpoint NAME (libvirt merges its bitmap into its parent's) and its file."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        dom.checkpointLookupByName(name, 0).delete(0)
    forget_checkpoint(state, name)
    with contextlib.suppress(libvirt.libvirtError, OSError):
        save_checkpoints(dom, state)


@control.handler("checkpoint-delete")
def _checkpoint_delete_op(context: control.Context, request: dict[str, Any],
                          _conn: control.Connection) -> dict[str, Any]:
    dom = _running(context)
    name = request.get("checkpoint")
    if not isinstance(name, str):
        raise control.ControlError("checkpoint-delete needs a checkpoint", "usage")
    drop_checkpoint(dom, paths.finalize_dirs(context.name).state, name)
    return {}
