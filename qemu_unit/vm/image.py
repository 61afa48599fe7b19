"""Image=: a base image never written, and the VM's own qcow2 overlay on top of it.

The overlay is made with `qemu-img create -b BASE -F FORMAT` (the base's format
written into it, so QEMU never probes the base) and kept in the state directory;
with Ephemeral=yes it lives in the runtime directory and is made afresh at every
start. Next to a kept overlay, `image.base` records what the base looked like
when the overlay was made; a base that changed since is reported, never rebased.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from qemu_unit import startup
from qemu_unit.config.settings import VMConfig
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.log import log as logger
from qemu_unit.paths import (
    BASE_RECORD,
    CHECKPOINTS_DIR,
    LOCK_FILE,
    OVERLAY,
    nvram_file,
    pull_unit_name,
    tpm_state_dir,
    unit_name,
)
from qemu_unit.vm.host import ImagePlan, pulled_base
from qemu_unit.vm.qcow2 import read_header


def virtual_size(path: Path) -> int:
    header = read_header(path)
    return header.virtual_size if header else path.stat().st_size


def identity(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": os.fspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino}


def _qemu_img(*args: str) -> None:
    # Here: an Image= VM's start needs qemu-img only the first time (~1.5 ms of subprocess).
    from qemu_unit import command

    command.run(["qemu-img", *args], f"qemu-img {args[0]}")


def prepare_overlay(vm: VMConfig, plan: ImagePlan) -> None:
    """Make (or check and keep) VM's overlay as PLAN says; the base is only ever read."""
    entry = vm.origin("Image")
    path, base = plan.overlay, plan.base
    record = path.with_name(BASE_RECORD)
    if vm.ephemeral:
        path.unlink(missing_ok=True)
    if not path.exists():
        size = [str(vm.disk_size)] if vm.disk_size else []
        if vm.disk_size and vm.disk_size < virtual_size(base):
            logger.warning("DiskSize=%d is below the base image's size: using the base's",
                           vm.disk_size)
            size = []
        tmp = path.with_name(path.name + ".new")
        tmp.unlink(missing_ok=True)
        _qemu_img("create", "-q", "-f", "qcow2", "-b", os.fspath(base), "-F", plan.base_format,
                  os.fspath(tmp), *size)
        os.replace(tmp, path)
        if not vm.ephemeral:
            record.write_text(json.dumps(identity(base)) + "\n")
            logger.info("Created the overlay %s on %s", path, base)
        return
    header = read_header(path)
    if header is None or header.backing_file != os.fspath(base):
        made_from = header.backing_file if header else "(not a qcow2 file)"
        raise ConfigError(
            f"the overlay {path} was made from {made_from}, not {base}: run "
            f"'qemu-unit reset {vm.name}' to start afresh from the new image",
            entry=entry, key="Image")
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError, RecursionError):
        recorded = None
    if recorded is not None and recorded != identity(base):
        logger.warning("The base image %s has changed since the overlay was made: the guest "
                       "may see a corrupt disk. The overlay is used as it is (never rebased); "
                       "'qemu-unit reset %s' starts afresh.", base, vm.name)
    if vm.disk_size:
        current = header.virtual_size
        if vm.disk_size > current:
            _qemu_img("resize", "-q", "-f", "qcow2", os.fspath(path), str(vm.disk_size))
            logger.info("Grew the overlay from %d to %d bytes (DiskSize=)", current, vm.disk_size)
        elif vm.disk_size < current:
            logger.warning("DiskSize=%d is below the overlay's size %d: the disk never shrinks",
                           vm.disk_size, current)


# How long a start waits for a pull that never shows up (no lock held, no progress).
PULL_ABSENT_SEC = 60.0
PULL_POLL_SEC = 0.5


def wait_for_pull(vm: VMConfig, notify: Any) -> None:
    """Return once VM's Image= URL is in the cache; show the pull's progress meanwhile.

    Under systemd the pull is qemu-run-pull@KEY.service, which the VM's unit wants
    (one job for every VM starting on the image); this waits for its result with
    the bytes and percent in STATUS= and the start timeout extended while it
    waits. Run by hand, with a cache this user can write, it pulls itself.
    """
    from qemu_unit.images import progress
    from qemu_unit.images.cache import Cache

    src = vm.image_source
    if src is None or pulled_base(vm) is not None:
        return
    # Minutes of pulling or waiting before the start goes on: collect as usual meanwhile.
    startup.resume()
    cache = Cache()
    key = src.key()
    if not os.environ.get("INVOCATION_ID") and _writable(cache.root):
        from qemu_unit.images.pull import pull

        reporter = progress.Reporter(cache, key, src.url)
        try:
            pull(src, cache, progress=reporter)
        finally:
            reporter.close()
        return
    started = time.time()
    last_seen = time.monotonic()
    logger.info("Waiting for %s to be pulled (%s)", src.url, pull_unit_name(key))
    while pulled_base(vm) is None:
        state = cache.read_progress(key)
        now = time.monotonic()
        if cache.is_pulling(key):
            last_seen = now
            done = progress.describe(state.get("done", 0), state.get("total"))
            notify.status(f"Waiting for the image: {done}")
        elif state.get("error") and state.get("time", 0) >= started - 5:
            # A digest or signature that does not match is for the .vm's author to
            # fix: 78 is in RestartPreventExitStatus=, so the VM fails once.
            error = ConfigError if state.get("permanent") else QemuUnitError
            raise error(f"pulling the image failed: {state['error']}")
        elif now - last_seen > PULL_ABSENT_SEC:
            raise QemuUnitError(f"{src.url} is not in the image cache and no pull runs "
                                f"(systemctl status {pull_unit_name(key)})")
        notify.extend_timeout(30)
        time.sleep(PULL_POLL_SEC)
    notify.status("Image pulled")


def _writable(root: Path) -> bool:
    while not root.exists() and root != root.parent:
        root = root.parent
    return os.access(root, os.W_OK)


def is_running(root: Path) -> bool:
    """Whether a runner holds the embed root ROOT (its lock file, see runner.locked_root)."""
    lock = root / LOCK_FILE
    try:
        # Root reads a file in the VM's own directory: no link followed, no FIFO waited
        # on, nothing written (flock needs no write access).
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise QemuUnitError(f"{lock}: {e.strerror}: not the runner's lock file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QemuUnitError(f"{lock} is not a regular file: not the runner's lock file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def reset(name: str, state: Path, root: Path) -> list[Path]:
    """Discard NAME's overlay, NVRAM, TPM and saved state, so the next start is a first
    boot; what was removed."""
    if is_running(root):
        raise QemuUnitError(f"VM {name} is running: stop it first "
                            f"(systemctl stop {unit_name(name)})")
    removed = []
    for path in (state / OVERLAY, state / BASE_RECORD, state / nvram_file(name)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    tpm = tpm_state_dir(state)
    if tpm.is_dir():
        shutil.rmtree(tpm)
        removed.append(tpm)
    # Backup checkpoints: their bitmaps were in the overlay just removed.
    from qemu_unit.vm import backup, saved

    if backup.forget_all_checkpoints(state):
        removed.append(state / CHECKPOINTS_DIR)
    # A saved state (HostShutdown=save) holds the memory of a guest on the disk just
    # removed: restoring it over a fresh one would corrupt the new guest.
    return removed + saved.discard(state)
