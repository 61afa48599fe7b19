"""Reading a file someone else may control: regular files only, never blocking, size-capped.

The generator (root, at boot), `register-machine` and the runner read files that
administrators name and that a VM's user may be able to replace: `.vm` files and
drop-ins, DomainXML=, UserData=, NetworkConfig=, SSH key files. A FIFO there must not
hang the generator (every other VM would go ungenerated), a device or a gigabyte file
must not be read whole, and where anyone but root can write the directory a symlink is
not followed (it could point root at any file).

Standard library only: the generator imports this at boot.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qemu_unit.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
# A .vm file or drop-in: systemd reads lines of up to 1 MiB; a VM needs a few KiB.
UNIT_FILE_MAX = 16 * MIB
# A DomainXML= file: libvirt's own limit for an XML document read from a file is 10 MB.
DOMAIN_XML_MAX = 10 * MIB
# cloud-init seed files and SSH key files go onto a small ISO for the guest.
SEED_FILE_MAX = 16 * MIB


def root_only(directory: Path) -> bool:
    """Whether only root can change what DIRECTORY holds (owned by root, no group or
    other write): a symlink in it was put there by root."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def read_limited(path: Path, limit: int, *, what: str = "file") -> bytes:
    """PATH's bytes: a regular file of at most LIMIT bytes, opened without blocking and,
    unless only root can write its directory, without following a symlink.

    OSError when it cannot be opened (missing, unreadable: callers decide); ConfigError
    naming PATH for a symlink where links are not followed, anything but a regular file,
    or a file over LIMIT.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    follow = root_only(path.parent)
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if not follow and os.path.islink(path):
            raise ConfigError(f"{what} is a symbolic link in a directory others can write: "
                              "name the file itself", path=path) from None
        raise e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} is not a regular file", path=path)
        if st.st_size > limit:
            raise ConfigError(f"{what} is larger than {limit // MIB} MiB", path=path)
        chunks = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > limit:  # it grew while being read
                raise ConfigError(f"{what} is larger than {limit // MIB} MiB", path=path)
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


CREDENTIAL_PREFIX = "qemu-unit.file."


def credential_id(path: Path | str) -> str:
    """The unit credential through which the runner reads PATH when only root can: the
    generator adds `LoadCredential=ID:PATH` for each such configuration file (a .vm holding
    SetCredential= is root's alone), systemd reads it as root at each start."""
    import hashlib  # only VMs with a root-only file pay for it at boot

    return CREDENTIAL_PREFIX + hashlib.sha256(os.fsencode(path)).hexdigest()[:32]


def read_config(path: Path, limit: int, *, what: str = "file") -> bytes:
    """read_limited(PATH), or, when this process may not read PATH, the copy of it that
    systemd handed the unit as a credential (credential_id)."""
    try:
        return read_limited(path, limit, what=what)
    except PermissionError:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        copy = Path(directory) / credential_id(path) if directory else None
        if copy is None or not os.path.exists(copy):
            raise
        return read_limited(copy, limit, what=what)
