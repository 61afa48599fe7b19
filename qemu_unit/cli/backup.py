"""`qemu-unit backup NAME DIR` and `qemu-unit restore DIR` (vm/backup.py has the layout).

The CLI (root, or the VM's own user for a rootless VM) writes the backup directory;
a running VM's disks are copied by its runner's backup job (QEMU writes into files
made here and lent to the VM's user for the job), a stopped VM's with qemu-img.
A stopped VM gets a full point each time: incremental points need the running
domain's checkpoints (its dirty bitmaps are only kept up to date by QEMU).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qemu_unit import command, paths
from qemu_unit.config import names, settings, source
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import backup, domain, host, image
from qemu_unit.vm.backup import Base, DiskCopy, File, Manifest, Point


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def qemu_img(*args: str) -> str:
    try:
        return command.run(["qemu-img", *args], f"qemu-img {args[0]}")
    except command.CommandError as e:
        raise QemuUnitError(f"qemu-img {args[0]} failed: {e.detail or e}") from None


def _virtual_size(path: Path, fmt: str) -> int:
    info = json.loads(qemu_img("info", "--output=json", "-U", "-f", fmt, os.fspath(path)))
    return int(info["virtual-size"])


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One backup or restore of DIRECTORY at a time."""
    with open(directory / paths.BACKUP_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QemuUnitError(f"{directory} is in use by another backup or restore"
                                ) from None
        yield


@dataclass(frozen=True)
class Plan:
    """What one backup of VM NAME reads."""

    vm: settings.VMConfig
    vm_file: Path
    xml: str
    image: host.ImagePlan | None
    state: Path
    running: bool


def plan_backup(name: str, search_path: list[Path] | None) -> Plan:
    src = source.find_source(names.check_name(name), search_path)
    vm = settings.load_vm(src)
    if vm.ephemeral:
        raise QemuUnitError(f"VM {name} is Ephemeral=yes: its disk is made afresh at every "
                            "start, there is nothing to back up")
    plan = host.plan(vm, probe=False)
    return Plan(vm, src.path, domain.render(vm, plan), plan.image, plan.dirs.state,
                image.is_running(plan.dirs.root))


def _lend(path: Path, state: Path) -> None:
    """Let the VM's user (the owner of its state directory) write PATH for the job."""
    if os.geteuid() == 0:
        st = state.stat()
        os.chown(path, st.st_uid, st.st_gid)


def _check_searchable(directory: Path, state: Path) -> None:
    """QEMU, running as the VM's user, must reach DIRECTORY/.ID.partial."""
    if os.geteuid() != 0:
        return
    owner = state.stat()
    st = directory.stat()
    if not (st.st_mode & 0o001 or (st.st_uid == owner.st_uid and st.st_mode & 0o100)
            or (st.st_gid == owner.st_gid and st.st_mode & 0o010)):
        raise QemuUnitError(f"{directory} must be searchable by the VM's user (uid "
                            f"{owner.st_uid}), which writes the disks of a running VM's "
                            f"backup: chmod o+x {directory}")


@contextlib.contextmanager
def exposed(plan: Plan, partial: Path) -> Iterator[Path]:
    """Where the running VM's QEMU can write PARTIAL: PARTIAL itself when the runner
    shares our mount namespace (run by hand), else a bind mount of it into the unit's
    namespace (`systemctl bind`; the unit's ProtectSystem=strict keeps everything else
    read-only), at STATE/.backup, unmounted again once the job is done."""
    from qemu_unit.cli import control

    pid = int(control.call(plan.vm.name, {"op": "ping"}).get("pid", 0))
    try:
        same = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        same = True  # not ours to see: a runner of this very user
    if same or os.geteuid() != 0:
        yield partial
        return
    inner = plan.state / paths.BACKUP_MOUNT
    inner.mkdir(mode=0o700, exist_ok=True)
    _lend(inner, plan.state)
    command.run(["systemctl", "bind", "--mkdir", paths.unit_name(plan.vm.name),
                 os.fspath(partial), os.fspath(inner)], "systemctl bind")
    try:
        yield inner
    finally:
        with contextlib.suppress(command.CommandError):
            command.run(["nsenter", "-t", str(pid), "-m", "umount", os.fspath(inner)],
                        "umount in the VM's namespace")
        with contextlib.suppress(OSError):
            inner.rmdir()


def _take_back(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def _base_of(plan: Plan, standalone: bool) -> Base | None:
    if plan.image is None or standalone:
        return None
    _say(f"summing the base image {plan.image.base}")
    return Base(os.fspath(plan.image.base), plan.image.base_format,
                backup.sha256_file(plan.image.base))


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def effective_vm(main: Path, dropins: Sequence[Path]) -> bytes:
    """The .vm as it takes effect: the file, then its drop-ins in the order they apply
    (a section may repeat in one file; its keys merge as a drop-in's do), so that a
    restore on another host, which has no NAME.vm.d/, gets every setting."""
    text = main.read_bytes()
    for d in dropins:
        text += f"\n# qemu-unit backup: the drop-in {d}\n".encode() + d.read_bytes()
    return text


def _progress(line: dict[str, Any], *, bar: list[Any]) -> None:
    done = line.get("progress", {}).get("done", 0)
    total = line.get("progress", {}).get("total", 0)
    if not sys.stderr.isatty() or not total:
        return
    if not bar:
        from tqdm import tqdm

        bar.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="backup", file=sys.stderr))
    bar[0].update(done - bar[0].n)


def run_backup(name: str, directory: Path, *, standalone: bool = False, full: bool = False,
               keep: int = 0, search_path: list[Path] | None = None) -> Point:
    """Add a point to DIRECTORY: incremental from its last one when the running VM still
    has that point's checkpoint, else full; then, with KEEP, drop the points the last
    KEEP do not need."""
    plan = plan_backup(name, search_path)
    # Searchable, not listable: QEMU (the VM's user) writes into a point being made.
    directory.mkdir(mode=0o711, parents=True, exist_ok=True)
    if plan.running:
        _check_searchable(directory, plan.state)
    with _locked(directory):
        manifest = backup.read_manifest(directory)
        if manifest is not None and manifest.name != plan.vm.name:
            raise QemuUnitError(f"{directory} holds backups of VM {manifest.name}, "
                                f"not {plan.vm.name}")
        manifest = manifest or Manifest(plan.vm.name)
        if backup.chain_full(manifest, keep):
            full = True
        point_id = backup.new_id(manifest)
        partial = directory / f".{point_id}{paths.BACKUP_PARTIAL_SUFFIX}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            point = _write_point(plan, directory, partial, manifest, point_id,
                                 standalone=standalone, full=full)
            os.rename(partial, directory / point_id)
            backup.fsync_dir(directory)
            after, gone = backup.prune(replace(manifest, points=(*manifest.points, point)),
                                       keep)
            backup.write_manifest(directory, after)
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(e, OSError):
                raise QemuUnitError(f"backup of {name} into {directory} failed: "
                                    f"{e.filename or partial}: {e.strerror or e}; nothing "
                                    "was kept") from None
            raise
        # Only once the manifest no longer names them.
        for old in gone:
            shutil.rmtree(directory / old, ignore_errors=True)
            _say(f"removed point {old} (keeping {keep})")
    # The last point's checkpoint is no longer needed: this one marks the new moment.
    if point.checkpoint and manifest.points:
        _forget(plan, manifest.points[-1].checkpoint)
    return point


def _forget(plan: Plan, checkpoint: str | None) -> None:
    """The previous point's checkpoint is no longer needed (its bitmap merges into the
    newer one): best effort, a stale one only costs a bitmap."""
    from qemu_unit.cli import control

    if checkpoint is None or not plan.running:
        return
    with contextlib.suppress(QemuUnitError):
        control.call(plan.vm.name, {"op": "checkpoint-delete", "checkpoint": checkpoint})


def _write_point(plan: Plan, directory: Path, partial: Path, manifest: Manifest,
                 point_id: str, *, standalone: bool, full: bool) -> Point:

    partial.mkdir(mode=0o700)
    disks = backup.writable_disks(plan.xml)
    if not disks:
        raise QemuUnitError(f"VM {plan.vm.name} has no writable disk to back up")
    last = manifest.points[-1] if manifest.points else None
    parent = last if (last is not None and not full and plan.running and last.checkpoint
                      ) else None
    if parent is not None and {d.target for d in parent.disks} != {d.target for d in disks}:
        parent = None
    # A live job copies what the guest sees: its full point is the flattened disk (libvirt
    # offers no sync=top), restorable without the base. Only a stopped VM's point is the
    # overlay's difference against the base (qemu-img convert -B).
    base = None if plan.running else _base_of(plan, standalone)
    checkpoint = backup.checkpoint_name(directory, point_id) if plan.running else None
    files: dict[str, Path] = {d.target: partial / f"{d.target}.qcow2" for d in disks}
    consistency = "stopped"
    if plan.running:
        _lend(partial, plan.state)
        with exposed(plan, partial) as seen:
            consistency, parent = _live_job(plan, disks, files, seen, checkpoint, parent)
        _take_back(partial)
        for p in partial.iterdir():
            _take_back(p)
    else:
        parent = None
        for d in disks:
            is_image = plan.image is not None and d.path == plan.image.overlay
            args = ["-B", base.path, "-F", base.format] if base and is_image else []
            qemu_img("convert", "-f", d.format, "-O", "qcow2", *args, os.fspath(d.path),
                     os.fspath(files[d.target]))
            if args:
                qemu_img("rebase", "-u", "-b", "", os.fspath(files[d.target]))
    vm_copy = partial / paths.BACKUP_VM_FILE
    vm_copy.write_bytes(effective_vm(plan.vm_file, plan.vm.dropins))
    nvram = backup.nvram_path(plan.xml)
    nvram_file = None
    if nvram is not None and nvram.exists():
        _copy(nvram, partial / paths.BACKUP_NVRAM)
        nvram_file = backup.describe(directory, partial / paths.BACKUP_NVRAM)
    tpm_file = None
    tpm = paths.tpm_state_dir(plan.state)
    if tpm.is_dir():
        with tarfile.open(partial / paths.BACKUP_TPM, "w") as tar:
            tar.add(tpm, arcname=".")
        tpm_file = backup.describe(directory, partial / paths.BACKUP_TPM)

    def final(path: Path) -> File:
        # Named as it will be once the partial directory is renamed.
        entry = backup.describe(directory, path)
        return replace(entry, path=f"{point_id}/{path.name}")

    return Point(
        id=point_id, parent=parent.id if parent else None, created=time.time(),
        consistency=consistency, checkpoint=checkpoint, standalone=base is None, base=base,
        vm=final(vm_copy),
        disks=tuple(DiskCopy(d.target, os.fspath(d.path),
                             plan.image is not None and d.path == plan.image.overlay,
                             d.format, final(files[d.target])) for d in disks),
        nvram=replace(nvram_file, path=f"{point_id}/{paths.BACKUP_NVRAM}") if nvram_file
        else None,
        tpm=replace(tpm_file, path=f"{point_id}/{paths.BACKUP_TPM}") if tpm_file else None,
    )


def _live_job(plan: Plan, disks: list[backup.Source], files: dict[str, Path], seen: Path,
              checkpoint: str | None, parent: Point | None) -> tuple[str, Point | None]:
    """The runner's backup job into FILES (QEMU sees their directory as SEEN): incremental
    from PARENT when the VM still has its checkpoint, else full. The consistency and the
    parent."""
    from qemu_unit.cli import control

    consistency = "crash-consistent"
    for attempt in ("incremental", "full"):
        if attempt == "incremental" and parent is None:
            continue
        for d in disks:
            target = files[d.target]
            target.unlink(missing_ok=True)
            size = str(_virtual_size(d.path, d.format))
            # No backing file yet (QEMU would open it): named once the job is done.
            qemu_img("create", "-q", "-f", "qcow2", os.fspath(target), size)
            _lend(target, plan.state)
        request = {"op": "backup", "checkpoint": checkpoint,
                   "incremental": parent.checkpoint if attempt == "incremental"
                   and parent is not None else None,
                   "targets": {d.target: os.fspath(seen / files[d.target].name)
                               for d in disks}}
        bar: list[Any] = []
        try:
            answer = control.call(plan.vm.name, request, functools.partial(_progress, bar=bar))
        except control.ControlFailed as e:
            if e.code == "no-checkpoint":
                _say(f"{e}: taking a full backup")
                parent = None
                continue
            raise QemuUnitError(f"backup of {plan.vm.name} failed: {e}; nothing was kept"
                                ) from None
        finally:
            if bar:
                bar[0].close()
        consistency = str(answer.get("consistency"))
        break
    if parent is not None:
        for d in disks:
            qemu_img("rebase", "-u", "-F", "qcow2", "-b",
                     f"../{parent.id}/{d.target}.qcow2", os.fspath(files[d.target]))
    return consistency, parent


# -- restore ---------------------------------------------------------------------------------


def chain_spec(directory: Path, chain: list[Point], target: str,
               base: Base | None) -> dict[str, Any]:
    """QEMU's block options naming the whole chain of TARGET's files explicitly (head
    first, each backing down to the base or none), so nothing depends on the backing
    names written in the files."""
    spec: dict[str, Any] | None = None if base is None else {
        "driver": base.format, "file": {"driver": "file", "filename": base.path}}
    for point in chain:
        disk = next(d for d in point.disks if d.target == target)
        spec = {"driver": "qcow2", "backing": spec,
                "file": {"driver": "file", "filename": os.fspath(directory / disk.file.path)}}
    assert spec is not None
    return spec


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Plain files and directories inside the destination, nothing else (Debian 12's
    Python has no extraction filters)."""
    members = tar.getmembers()
    for m in members:
        if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
            raise backup.CorruptBackup(f"{paths.BACKUP_TPM}: unexpected member {m.name!r}")
    return members


_IMAGE_LINE = re.compile(r"^\s*(Image|ImageChecksum|ImageChecksums|ImageSignature|"
                         r"ImageKeyring|ImageVerify)\s*=.*$", re.M)


def standalone_vm_text(text: str, base: Path) -> str:
    """The .vm with Image= naming the restored flattened disk (and no Image* URL keys)."""
    text = _IMAGE_LINE.sub(lambda m: f"Image={base}" if m.group(1) == "Image" else "", text)
    return text


def restore(directory: Path, as_name: str | None = None, point_id: str | None = None,
            config_dir: Path = paths.CONFIG_DIR) -> tuple[str, Point]:
    """Rebuild the VM of DIRECTORY's point POINT_ID (default: the last) as AS_NAME."""
    directory = directory.resolve()
    manifest = backup.read_manifest(directory)
    if manifest is None:
        raise QemuUnitError(f"{directory} holds no backup (no {paths.BACKUP_MANIFEST})")
    with _locked(directory):
        chain = manifest.chain(point_id)
        point = chain[-1]
        _say(f"checking {sum(len(p.files()) for p in chain)} file(s) of point {point.id}")
        backup.verify(directory, chain)
        name = names.check_name(as_name or manifest.name)
        vm_file = config_dir / f"{name}.vm"
        if vm_file.exists():
            raise QemuUnitError(f"{vm_file} exists: restore --as another name, or remove it")
        state = paths.finalize_dirs(name).state
        if image.is_running(paths.finalize_dirs(name).root):
            raise QemuUnitError(f"VM {name} is running")
        base = point.base
        if base is not None:
            path = Path(base.path)
            if not path.exists():
                raise QemuUnitError(f"the backup needs its base image {path} (sha256 "
                                    f"{base.sha256}), which is not on this host: put it "
                                    "there, or take backups with --standalone")
            if backup.sha256_file(path) != base.sha256:
                raise QemuUnitError(f"the base image {path} is not the one the backup was "
                                    f"taken on (sha256 differs from {base.sha256})")
        vm_text = (directory / point.vm.path).read_text()
        outputs: list[tuple[DiskCopy, Path]] = []
        for d in point.disks:
            if d.image:
                out = state / (paths.RESTORED_BASE if base is None else paths.OVERLAY)
            else:
                out = Path(d.source)
            if out.exists():
                raise QemuUnitError(f"{out} exists: the restore does not overwrite a disk "
                                    "(remove it, or restore --as another name)")
            outputs.append((d, out))
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        made: list[Path] = []
        try:
            for d, out in outputs:
                tmp = out.with_name(out.name + paths.BACKUP_PARTIAL_SUFFIX)
                made.append(tmp)
                spec = chain_spec(directory, chain, d.target, base if d.image else None)
                fmt = "qcow2" if d.image else d.format
                backing = ["-B", base.path, "-F", base.format] if d.image and base else []
                qemu_img("convert", "-O", fmt, *backing, "json:" + json.dumps(spec),
                         os.fspath(tmp))
                os.rename(tmp, out)
                made[-1] = out
            if base is not None:
                (state / paths.BASE_RECORD).write_text(
                    json.dumps(image.identity(Path(base.path))) + "\n")
            elif any(d.image for d in point.disks):
                vm_text = standalone_vm_text(vm_text, state / paths.RESTORED_BASE)
            if point.nvram is not None:
                _copy(directory / point.nvram.path, state / paths.nvram_file(name))
                made.append(state / paths.nvram_file(name))
            if point.tpm is not None:
                tpm = paths.tpm_state_dir(state)
                tpm.mkdir(parents=True, exist_ok=True)
                with tarfile.open(directory / point.tpm.path) as tar:
                    tar.extractall(tpm, members=_safe_members(tar))
            config_dir.mkdir(parents=True, exist_ok=True)
            tmp_vm = vm_file.with_name(vm_file.name + paths.BACKUP_PARTIAL_SUFFIX)
            tmp_vm.write_text(vm_text)
            os.rename(tmp_vm, vm_file)
        except BaseException as e:
            for path in made:
                path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise QemuUnitError(f"restore of {directory} failed: {e.filename}: "
                                    f"{e.strerror or e}; nothing was kept") from None
            raise
    return name, point


def list_points(directory: Path) -> list[Point]:
    manifest = backup.read_manifest(directory)
    return list(manifest.points) if manifest else []
