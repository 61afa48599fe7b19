"""`qemu-unit auto-update [--dry-run]`: move AutoUpdate= VMs to the image their sums name now.

For each image source that AutoUpdate= VMs use: re-read the sums (and the signature); if
they name another image, pull it (as the pull user, as the pull unit would) and restart
the source's running VMs on it (AutoUpdate=reset: stop, discard the overlay, start).
`systemctl restart` returns once the unit is ready (READY=1 after Ready=) or failed, so a
VM that does not become ready within its start timeout fails it; the source then goes
back to the previous image and its VMs are restarted on that; the failed image is remembered
and not tried again while the sums keep naming it. Every step is a journal line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from qemu_unit import command, paths
from qemu_unit.config import settings, source
from qemu_unit.config.imagesource import ImageSource
from qemu_unit.errors import QemuUnitError
from qemu_unit.images.cache import Cache
from qemu_unit.log import log


@dataclass
class Source:
    image: ImageSource
    vms: list[settings.VMConfig] = field(default_factory=list)


def candidates(search_path: Sequence[Path] | None = None) -> dict[str, Source]:
    """{source key: the source and its AutoUpdate= VMs}."""
    found: dict[str, Source] = {}
    for src in source.list_sources(search_path):
        try:
            vm = settings.load_vm(src)
        except QemuUnitError as e:
            log.warning("auto-update: skipping %s: %s", src.path, e)
            continue
        if vm.image_source is None or vm.auto_update is settings.AutoUpdate.NO:
            continue
        found.setdefault(vm.image_source.key(), Source(vm.image_source)).vms.append(vm)
    return found


def _systemctl(*args: str) -> bool:
    """Whether `systemctl ARGS` succeeded (restart/start: the unit became ready)."""
    try:
        command.run(["systemctl", *args], f"systemctl {args[0]}")
    except command.CommandError:
        return False
    return True


def _active(unit: str) -> bool:
    return _systemctl("is-active", "--quiet", unit)


def _pull_update(src: ImageSource, cache: Cache) -> None:
    """`qemu-unit image pull --update` as the pull user (root only hands the job over)."""
    cmd = ["env", f"{paths.IMAGE_CACHE_ENV}={cache.root}", sys.executable, "-m", "qemu_unit",
           "image", "pull", "--update", *src.pull_arguments()]
    if os.geteuid() == 0:
        # setpriv (util-linux): no PAM session, no groups, a clean environment.
        cmd = ["setpriv", f"--reuid={paths.PULL_USER}", f"--regid={paths.PULL_USER}",
               "--clear-groups", "--reset-env", *cmd]
    try:
        command.run(cmd, f"pulling {src.url}")
    except command.CommandError as e:
        raise QemuUnitError(f"pulling {src.url} failed: "
                            f"{(e.detail.splitlines() or [str(e)])[-1]}") from None


def _restart(vm: settings.VMConfig) -> bool:
    """Restart VM on the image its source resolves to now; whether it became ready."""
    unit = paths.unit_name(vm.name)
    if vm.auto_update is settings.AutoUpdate.RESET:
        from qemu_unit.vm import image

        _systemctl("stop", unit)
        dirs = paths.finalize_dirs(vm.name)
        image.reset(vm.name, dirs.state, dirs.root)
        started = _systemctl("start", unit)
    else:
        started = _systemctl("restart", unit)
    return started and _active(unit)


def run(*, dry_run: bool = False, search_path: Sequence[Path] | None = None,
        cache: Cache | None = None) -> int:
    """0 when every source is current (or was moved), 1 when one was rolled back or failed."""
    cache = cache or Cache()
    status = 0
    for key, item in candidates(search_path).items():
        src = item.image
        names = ", ".join(vm.name for vm in item.vms)
        old = cache.read_ref(key)
        try:
            if dry_run:
                from qemu_unit.images import fetch
                from qemu_unit.images.pull import expected

                want = expected(src, cache, fetch.DEFAULT_RETRY)
                if old is None or not old.verified.startswith(f"{want} "):
                    print(f"would update {names}: {src.url} -> {want}")
                else:
                    print(f"up to date: {names} ({old.digest})")
                continue
            _pull_update(src, cache)
        except QemuUnitError as e:
            log.error("auto-update: %s (%s): %s", src.url, names, e)
            status = 1
            continue
        new = cache.read_ref(key)
        if new is None or (old is not None and new.digest == old.digest):
            log.info("auto-update: %s is up to date (%s)", names, new.digest if new else "-")
            continue
        if old is not None and new.digest == old.rejected:
            # The pull moved the source's ref: put it back, or the next start would boot
            # the image that failed before.
            _write_ref_as_owner(cache, key, old)
            log.warning("auto-update: %s stays on %s: %s still names %s, which did not become "
                        "ready before; the next image the sums name is tried",
                        names, old.digest, src.url, new.digest)
            continue
        log.info("auto-update: %s: %s -> %s (%s)", names, old.digest if old else "nothing",
                 new.digest, src.url)
        running = [vm for vm in item.vms if _active(paths.unit_name(vm.name))
                   or vm.auto_update is settings.AutoUpdate.RESET]
        failed = [vm.name for vm in running if not _restart(vm)]
        if not failed:
            continue
        status = 1
        if old is None or not cache.blob(old.digest).exists():
            log.error("auto-update: %s did not become ready on %s and there is no previous "
                      "image to go back to", ", ".join(failed), new.digest)
            continue
        log.error("auto-update: %s did not become ready on %s: rolling back to %s",
                  ", ".join(failed), new.digest, old.digest)
        _write_ref_as_owner(cache, key, replace(old, previous=new.digest, rejected=new.digest))
        for vm in running:
            if not _restart(vm):
                log.error("auto-update: %s did not become ready on the previous image %s "
                          "either", vm.name, old.digest)
            else:
                log.info("auto-update: %s is back on %s", vm.name, old.digest)
    return status


def _write_ref_as_owner(cache: Cache, key: str, ref: object) -> None:
    """Write the ref and give it to the cache's owner (root writes for the pull user here)."""
    cache.write_ref(key, ref)  # type: ignore[arg-type]
    owner = cache.refs.stat()
    path = cache.refs / f"{key}.json"
    if os.geteuid() == 0 and path.stat().st_uid != owner.st_uid:
        os.chown(path, owner.st_uid, owner.st_gid)
