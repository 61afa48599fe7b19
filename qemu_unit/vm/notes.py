"""Notes a root step of the VM's unit leaves for its runner in the runtime directory.

The directory belongs to the VM's user: root opens it and the note without following a
link, creates the note anew (O_EXCL) and makes it readable (the unit's UMask=0077 applies
to root steps too, and the runner is another uid). The runner reads a note as a regular
file of bounded size, without following a link or blocking.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

LIMIT = 4096


def leave(directory: Path, note: str, text: str) -> None:
    """Write NOTE in DIRECTORY (root, in the VM user's runtime directory); OSError if not."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(note, dir_fd=fd)
        out = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o644, dir_fd=fd)
        try:
            os.fchmod(out, 0o644)
            os.write(out, text.encode()[:LIMIT] + b"\n")
        finally:
            os.close(out)
    finally:
        os.close(fd)


def read(directory: Path, note: str) -> str:
    """NOTE's text (at most LIMIT bytes, stripped); OSError when there is none."""
    fd = os.open(directory / note, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{directory / note} is not a regular file")
        return os.read(fd, LIMIT).decode(errors="replace").strip()
    finally:
        os.close(fd)
