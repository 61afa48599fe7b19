"""The qcow2 header: the one reader of it (host.detect_format, image's overlay checks,
pulled images).

Only the fields qemu-unit needs, from QEMU's docs/interop/qcow2.txt: the magic, the
version, the backing file's offset and length, the virtual size and (version 3) the
incompatible feature bits.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qemu_unit.records import NamedTuple

MAGIC = b"QFI\xfb"
# Version 3's header up to and including header_length.
HEADER_V3 = 104
# Incompatible feature bits QEMU 7.2 knows: dirty, corrupt, external data file,
# compression type, extended L2 entries. An external data file makes QEMU open another
# host file read-write; a bit QEMU does not know is one no check here can reason about.
DATA_FILE_BIT = 1 << 2
KNOWN_INCOMPATIBLE = 0b11111


class Header(NamedTuple):
    virtual_size: int
    backing_file: str  # "" when there is none
    version: int = 2
    incompatible: int = 0  # version 3's incompatible feature bits
    short: bool = False  # a version 3 header cut short

    def problem(self) -> str | None:
        """Why QEMU must not open this image whatever the VM says: an external data file,
        an incompatible feature QEMU 7.2 does not know; None when there is none."""
        if self.short:
            return "its qcow2 header is cut short"
        if self.incompatible & DATA_FILE_BIT:
            return "it is a qcow2 image with an external data file (QEMU would open another file)"
        unknown = self.incompatible & ~KNOWN_INCOMPATIBLE
        if unknown:
            return f"it is a qcow2 image with unknown incompatible features (0x{unknown:x})"
        return None


def parse_header(head: bytes) -> Header | None:
    """The header in HEAD (an image's first HEADER_V3 bytes); None when not qcow2."""
    if head[:4] != MAGIC:
        return None
    version = int.from_bytes(head[4:8], "big")
    incompatible = int.from_bytes(head[72:80], "big") if len(head) >= 80 else 0
    return Header(virtual_size=int.from_bytes(head[24:32], "big"), backing_file="",
                  version=version, incompatible=incompatible if version >= 3 else 0,
                  short=version >= 3 and len(head) < HEADER_V3)


def read_header(path: Path) -> Header | None:
    """PATH's qcow2 header; None when PATH is not a qcow2 image or neither a regular file
    nor a block device (OSError if unreadable). Opened without blocking: a FIFO or a tty
    where an image should be must not hang the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return None
        head = os.pread(fd, HEADER_V3, 0)
        header = parse_header(head)
        if header is None:
            return None
        backing_offset = int.from_bytes(head[8:16], "big")
        backing_size = int.from_bytes(head[16:20], "big")
        backing = ""
        if backing_offset and backing_size:
            backing = os.pread(fd, backing_size, backing_offset).decode(errors="replace")
        elif backing_offset:
            backing = "?"  # an offset without a length: still a backing file
    finally:
        os.close(fd)
    return Header(header.virtual_size, backing, header.version, header.incompatible,
                  header.short)
