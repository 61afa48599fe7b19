"""HostShutdown=save: a running VM's memory kept in its state directory across a stop.

Layout in the state directory (it outlives the volatile embed root):

    saved/memory     libvirt's save image (virDomainSaveFlags)
    saved/meta.json  its size and sha256, when it was made, the sha256 of the rendered
                     domain XML and the identity of the Image= base it was made over

A save is written into `saved.new/` and becomes `saved/` by one rename, after
both files and the directory were fsynced: a reader finds a complete save or
none. `meta.json` is written (padded) *before* libvirt writes the memory and
overwritten in place afterwards, so a disk that fills up fails the save while
the guest still runs (libvirt resumes it), never after it stopped. A leftover
`saved.new/` (the runner was killed while saving) is removed at the next start,
which then boots cold from the disks, with one line.

A save is restored only when it still fits: the same rendered domain, the same
base image, the checksum right. Otherwise the start fails (exit 78) and names
`qemu-unit discard-save NAME`: a saved state is never dropped silently.

Host shutdown or `systemctl stop`? systemd's SystemState is "stopping" while a start
job of shutdown.target is queued, which a poweroff, reboot, halt or kexec queues
together with the stop jobs of every unit. The runner cannot ask: over the bus the
question hung during shutdown (dbus-daemon waited on a stopping machined), and the
manager's private socket is root's. So the unit's `ExecStop=+` step (root, before
systemd signals the runner) asks through that socket (`systemctl show`, which uses
/run/systemd/private as root) and leaves the answer in STOP_NOTE in the runtime
directory (note_stop); the runner reads it on SIGTERM (stop_note). No note (a signal
from elsewhere, an old unit file) counts as a plain stop: the guest is shut down.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from qemu_unit import paths
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.records import NamedTuple
from qemu_unit.vm import control, notes
from qemu_unit.vm.events import SaveRequested

SAVED = paths.SAVED_DIR
SAVING = paths.SAVING_DIR
MEMORY = paths.SAVED_MEMORY
META = paths.SAVED_META
META_SIZE = 4096  # meta.json is padded to this size and rewritten in place
VERSION = 1
NOTE_TIMEOUT = 10.0  # seconds for the SystemState question (a busy PID 1 at shutdown)
STOP_NOTE = paths.STOP_NOTE


class SavedState(NamedTuple):
    """A complete save in STATE/saved (see the module docstring)."""

    dir: Path
    size: int
    created: int  # seconds since the epoch
    sha256: str
    xml_sha256: str
    base: dict[str, Any] | None

    @property
    def memory(self) -> Path:
        return self.dir / MEMORY


# The runner imports this module at every start, where most VMs have no save: json and
# hashlib (~2.5 ms) are imported by the functions that need them.
def xml_digest(xml: str) -> str:
    import hashlib

    return hashlib.sha256(xml.encode()).hexdigest()


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read(state: Path) -> SavedState | None:
    """The save in STATE as its meta.json describes it (nothing verified); None if none.
    QemuUnitError when there is a saved/ whose meta.json cannot be read."""
    d = state / SAVED
    if not d.is_dir():
        return None
    import json

    try:
        meta = json.loads((d / META).read_text())
        return SavedState(d, int(meta["size"]), int(meta["created"]), str(meta["sha256"]),
                          str(meta["xml_sha256"]), meta.get("base"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QemuUnitError(f"{d / META}: unreadable ({e})") from None


def _discard_hint(name: str) -> str:
    return f"run 'qemu-unit discard-save {name}' to drop it and boot afresh"


def check(name: str, state: Path, xml: str, base: dict[str, Any] | None,
          warn: Any) -> SavedState | None:
    """The save to restore at this start, verified; None when there is none.

    A leftover SAVING directory is removed (WARN says so). ConfigError (one line naming
    discard-save) for a save that does not fit XML or BASE, or fails its checksum."""
    partial = state / SAVING
    if partial.exists():
        import shutil  # here, not at the top: check() runs before every createXML

        shutil.rmtree(partial, ignore_errors=True)
        warn("An incomplete saved state was found (the runner was stopped while saving) "
             "and removed: booting from the disks")
    try:
        saved = read(state)
    except QemuUnitError as e:
        raise ConfigError(f"{e}; {_discard_hint(name)}") from None
    if saved is None:
        return None
    where = saved.dir
    if saved.xml_sha256 != xml_digest(xml):
        raise ConfigError(f"the saved state no longer fits VM {name}: its domain changed "
                          f"since the save; {_discard_hint(name)}", path=where)
    if saved.base != base:
        raise ConfigError(f"the saved state no longer fits VM {name}: its base image changed "
                          f"since the save; {_discard_hint(name)}", path=where)
    try:
        size = saved.memory.stat().st_size
        digest = file_digest(saved.memory) if size == saved.size else ""
    except OSError as e:
        raise ConfigError(f"the saved state is unreadable ({e.strerror}); "
                          f"{_discard_hint(name)}", path=where) from None
    if digest != saved.sha256:
        raise ConfigError(f"the saved state is corrupt (checksum mismatch); "
                          f"{_discard_hint(name)}", path=where)
    return saved


def _write_meta(fd: int, meta: dict[str, Any]) -> None:
    import json

    text = json.dumps(meta, sort_keys=True).encode()
    if len(text) >= META_SIZE:
        raise QemuUnitError("saved state metadata too large")
    # Same length every time: rewriting allocated blocks needs no free space.
    os.pwrite(fd, text + b"\n" + b" " * (META_SIZE - len(text) - 1), 0)
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(dom: Any, state: Path, xml: str, base: dict[str, Any] | None) -> SavedState:
    """Save the running domain DOM into STATE/saved (stops it); QemuUnitError on failure,
    with nothing left behind and, if libvirt allowed, the domain still running."""
    import shutil

    import libvirt

    partial = state / SAVING
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(mode=0o700)
        fd = os.open(partial / META, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            meta: dict[str, Any] = {"version": VERSION, "created": int(time.time()),
                                    "size": 0, "sha256": "", "xml_sha256": xml_digest(xml),
                                    "base": base}
            _write_meta(fd, meta)
            try:
                dom.saveFlags(os.fspath(partial / MEMORY), None, 0)
            except libvirt.libvirtError as e:
                raise QemuUnitError(
                    f"saving the VM failed: {e.get_error_message() or e}") from None
            memory = partial / MEMORY
            with open(memory, "rb") as f:
                os.fsync(f.fileno())
            meta["size"] = memory.stat().st_size
            meta["sha256"] = file_digest(memory)
            _write_meta(fd, meta)
        finally:
            os.close(fd)
        _fsync_dir(partial)
        os.rename(partial, state / SAVED)
        _fsync_dir(state)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise QemuUnitError(f"saving the VM failed: {e.filename or partial}: "
                            f"{e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    saved = read(state)
    assert saved is not None
    return saved


def written(state: Path) -> int:
    """Bytes of the save in progress so far (progress while libvirt writes)."""
    try:
        return (state / SAVING / MEMORY).stat().st_size
    except OSError:
        return 0


def discard(state: Path) -> list[Path]:
    """Remove the saved state (complete or not) from STATE; what was removed."""
    import shutil

    removed = []
    for d in (state / SAVED, state / SAVING):
        if d.exists():
            shutil.rmtree(d)
            removed.append(d)
    return removed


@control.handler("save")
def _save_op(context: control.Context, _request: dict[str, Any],
             conn: control.Connection) -> dict[str, Any]:
    """`qemu-unit save NAME`: the runner saves the VM and stops. The outcome also goes out as
    an intermediate line: the runner may close the socket on its way out before the final
    line is written."""
    if context.domain() is None:
        raise control.ControlError(f"VM {context.name} is not running", "not-running")
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def reply(result: dict[str, Any]) -> None:
        # Called by the main loop, which then ends the runner: the line is out before it.
        outcome.update(result)
        if "error" not in result:
            with contextlib.suppress(OSError):
                conn.send({"saved": result})
        done.set()

    context.post(SaveRequested(reply))
    done.wait()
    if "error" in outcome:
        raise control.ControlError(str(outcome["error"]))
    return {"saved": outcome}


def note_stop(name: str, roots: Path = paths.SYSTEM_RUNTIME) -> int:
    """`qemu-unit note-stop NAME`, the unit's ExecStop=+ (root): leave systemd's state for
    the runner in its runtime directory. Never fails the stop (exit 0; a warning says why)."""
    from qemu_unit import command, log
    from qemu_unit.config.names import check_name

    check_name(name)
    try:
        state = command.run(["systemctl", "show", "--property=SystemState", "--value"],
                            "asking systemd for its state", timeout=NOTE_TIMEOUT).strip()
    except QemuUnitError as e:
        log.log.warning("Stop of %s: systemd's state unknown (%s): a plain stop", name, e)
        return 0
    if not (roots / name).is_dir():
        # The runner is gone already (qemu-unit save, a crash): nothing to tell.
        log.log.info("Stop of %s: no runtime directory to leave systemd's state in", name)
        return 0
    try:
        notes.leave(roots / name, STOP_NOTE, state)
        log.log.info("Stop of %s: systemd's state is %r (left for the runner)", name, state)
    except OSError as e:
        log.log.warning("Stop of %s: cannot leave systemd's state for the runner: %s", name, e)
    return 0


def stop_note(root: Path) -> str:
    """systemd's state when this stop began, as the ExecStop=+ step left it in ROOT (the
    runtime directory); "unknown (...)" without one."""
    try:
        return notes.read(root, STOP_NOTE)[:40] or "unknown (empty note)"
    except OSError as e:
        return f"unknown (no note from the unit's ExecStop= step: {e.strerror or e})"
