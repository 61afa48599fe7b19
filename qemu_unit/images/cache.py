"""The shared image cache: content-addressed, written by the pulling user, read by VMs.

    ROOT/blobs/sha256-HEX     a verified image (decompressed), 0444; HEX is its sha256
    ROOT/refs/KEY.json        what the source KEY (ImageSource.key()) resolved to:
                              digest, format, size, what vouched for it, the previous digest
    ROOT/locks/KEY.lock       held (flock) while KEY is pulled: one pull per source
    ROOT/progress/KEY.json    bytes and total of a running pull, or its error (for the
                              VM units waiting on it)
    ROOT/tmp/                 0700: partial downloads, invisible to VMs

A blob appears (rename into blobs/) only after its digest matched; nothing under
tmp/ is readable by anyone else. ROOT is /var/lib/qemu-run/images for the system
(the pull unit's StateDirectory=), ~/.local/state/qemu-run/images for a user, or
$QEMU_UNIT_IMAGES.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu_unit import paths
from qemu_unit.config.imagesource import ImageSource
from qemu_unit.errors import QemuUnitError

SYSTEM_CACHE = paths.SYSTEM_IMAGES
CACHE_ENV = paths.IMAGE_CACHE_ENV
BLOB_PREFIX = "sha256-"


def default_root() -> Path:
    if value := os.environ.get(CACHE_ENV):
        return Path(value)
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    home = Path(os.environ.get("HOME") or "/")
    state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local/state")
    return state / paths.PROJECT_DIR / paths.IMAGES_DIR


@dataclass(frozen=True)
class Ref:
    """What one source resolved to when it was last pulled."""

    source: ImageSource
    digest: str  # "sha256:HEX" of the stored (decompressed) image
    format: str  # qcow2 or raw
    size: int
    verified: str  # what vouched for it, e.g. "sha512:HEX from URL (NAME)"; "" if nothing
    pulled: float  # time.time()
    previous: str | None = None  # the digest before the last change: auto-update's rollback
    # A digest auto-update rolled back from: never moved to again (the sums may keep naming it).
    rejected: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source.as_dict(), "digest": self.digest, "format": self.format,
                "size": self.size, "verified": self.verified, "pulled": self.pulled,
                "previous": self.previous, "rejected": self.rejected}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ref:
        return cls(ImageSource.from_dict(d["source"]), str(d["digest"]), str(d["format"]),
                   int(d["size"]), str(d.get("verified", "")), float(d.get("pulled", 0)),
                   d.get("previous"), d.get("rejected"))


def digest_hex(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise QemuUnitError(f"invalid image digest {digest!r}: expected sha256:HEX")
    return hexdigest


class Cache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()
        self.blobs = self.root / "blobs"
        self.refs = self.root / "refs"
        self.locks = self.root / "locks"
        self.progress = self.root / "progress"
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        """Make the layout: everything readable by VMs except tmp/."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        for d in (self.blobs, self.refs, self.locks, self.progress):
            d.mkdir(exist_ok=True, mode=0o755)
        self.tmp.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.tmp, 0o700)

    def blob(self, digest: str) -> Path:
        return self.blobs / (BLOB_PREFIX + digest_hex(digest))

    def digest_of(self, path: Path) -> str | None:
        """The digest of a blob path (e.g. an overlay's backing file), None if not a blob."""
        if path.parent != self.blobs or not path.name.startswith(BLOB_PREFIX):
            return None
        return "sha256:" + path.name.removeprefix(BLOB_PREFIX)

    # -- refs ---------------------------------------------------------------------------

    def read_ref(self, key: str) -> Ref | None:
        try:
            return Ref.from_dict(json.loads((self.refs / f"{key}.json").read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QemuUnitError(f"{self.refs / f'{key}.json'}: unreadable ({e})") from None

    def write_ref(self, key: str, ref: Ref) -> None:
        _write_atomic(self.refs / f"{key}.json", json.dumps(ref.as_dict(), indent=1) + "\n")

    def all_refs(self) -> dict[str, Ref]:
        refs = {}
        for path in sorted(self.refs.glob("*.json")) if self.refs.is_dir() else ():
            with contextlib.suppress(QemuUnitError):
                if (ref := self.read_ref(path.stem)) is not None:
                    refs[path.stem] = ref
        return refs

    def current(self, key: str) -> Path | None:
        """The blob the source KEY resolves to now, if it is in the cache."""
        ref = self.read_ref(key)
        if ref is None:
            return None
        path = self.blob(ref.digest)
        return path if path.exists() else None

    # -- one pull per source ------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def is_pulling(self, key: str) -> bool:
        """Whether a pull of KEY holds its lock now (works on a read-only cache)."""
        try:
            fd = os.open(self.locks / f"{key}.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def write_progress(self, key: str, **fields: Any) -> None:
        with contextlib.suppress(OSError):
            _write_atomic(self.progress / f"{key}.json",
                          json.dumps({"time": time.time(), **fields}) + "\n")

    def read_progress(self, key: str) -> dict[str, Any]:
        try:
            value = json.loads((self.progress / f"{key}.json").read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def clear_progress(self, key: str) -> None:
        (self.progress / f"{key}.json").unlink(missing_ok=True)

    # -- blobs --------------------------------------------------------------------------

    def list_blobs(self) -> list[Path]:
        if not self.blobs.is_dir():
            return []
        return sorted(p for p in self.blobs.iterdir() if p.name.startswith(BLOB_PREFIX))

    def remove_blob(self, digest: str) -> None:
        """Remove a blob and every ref that resolves to it."""
        for key, ref in self.all_refs().items():
            if ref.digest == digest:
                (self.refs / f"{key}.json").unlink(missing_ok=True)
        self.blob(digest).unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
