"""The qcow2 header: the one reader of it (host.detect_format, image's overlay checks).

Only the fields qemu-unit needs, from QEMU's docs/interop/qcow2.txt: the magic,
the backing file's offset and length, the virtual size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Header:
    virtual_size: int
    backing_file: str  # "" when there is none


def read_header(path: Path) -> Header | None:
    """PATH's qcow2 header; None when PATH is not a qcow2 image (OSError if unreadable)."""
    with open(path, "rb") as f:
        header = f.read(32)
        if header[:4] != MAGIC:
            return None
        backing_offset = int.from_bytes(header[8:16], "big")
        backing_size = int.from_bytes(header[16:20], "big")
        backing = ""
        if backing_offset and backing_size:
            f.seek(backing_offset)
            backing = f.read(backing_size).decode(errors="replace")
        elif backing_offset:
            backing = "?"  # an offset without a length: still a backing file
    return Header(virtual_size=int.from_bytes(header[24:32], "big"), backing_file=backing)
