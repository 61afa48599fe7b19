"""QEMU's capability cache: probed once per host, read by every VM, written by none.

libvirt probes QEMU (~2.5 s) before its first domain and keeps the answer in
`ROOT/cache/qemu/capabilities/*.xml`, checked at every use against QEMU's binary,
libvirt and the kernel. `qemu-unit-caps.service` (user `qemu-run`) makes that cache in
SHARED (/var/cache/qemu-run) with `prepare()`, readable by all. Each VM runs as a user
of its own and cannot write SHARED: `seed()` copies the shared files into the VM's own
cache (in its runtime directory) when they are newer, so libvirt finds them there; a VM
whose copy has gone stale (QEMU upgraded since the shared cache was made) probes into
its own cache, which works, only slower.
"""

from __future__ import annotations

import os
from pathlib import Path

from qemu_unit.log import log
from qemu_unit.paths import CAPABILITIES, SYSTEM_CACHE

SHARED = SYSTEM_CACHE


def seed(cache: Path, shared: Path = SHARED) -> int:
    """Copy SHARED's capability files into CACHE where newer; how many were copied."""
    if cache == shared:
        return 0
    source = shared / CAPABILITIES
    try:
        files = [p for p in source.iterdir() if p.suffix == ".xml"]
    except OSError:
        return 0  # no shared cache (yet): libvirt probes into CACHE
    target = cache / CAPABILITIES
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    copied = 0
    for src in files:
        dest = target / src.name
        try:
            if dest.exists() and dest.stat().st_mtime_ns >= src.stat().st_mtime_ns:
                continue
            # A plain copy, not shutil's: shutil (with bz2 and lzma) costs ~1.9 ms of every
            # start before createXML. The copy's own mtime is newer than SRC's, as the check
            # above needs; libvirt judges the files by their contents.
            tmp = target / f".{src.name}.tmp"
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, dest)
            copied += 1
        except OSError as e:
            log.warning("Cannot copy the shared capability cache %s: %s", src, e.strerror)
    return copied
