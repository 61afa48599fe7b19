"""Pulling one image into the cache: fetch, decompress while downloading, verify, publish.

    pull(source, cache) -> Ref

Under the source's lock (one pull per source, whoever asks): if the cache already
resolves the source (and no update is asked for), nothing is fetched. Otherwise
the sums file (and its signature, through gpgv) is read first, so a bad signature
fails before any image byte moves; then the image is downloaded into tmp/
(resumable), decompressed on the fly (lzma, zlib, zstandard), hashed as it
arrives, checked against what vouched for it, checked to be qcow2 without a
backing file or raw, and only then renamed into blobs/ (0444). A wrong digest, a
bad signature or a full disk leaves nothing in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu_unit.config.imagesource import ImageSource
from qemu_unit.errors import QemuUnitError
from qemu_unit.images import fetch, verify
from qemu_unit.images.cache import Cache, Ref, is_disk_full
from qemu_unit.images.verify import Expected, VerificationError
from qemu_unit.vm import qcow2

Progress = Callable[[int, int | None], None]


class _Decompressor:
    """One streaming decompressor by the URL's suffix; None: stored as served."""

    def __init__(self, name: str) -> None:
        self.kind = next((s for s in (".xz", ".gz", ".zst") if name.endswith(s)), None)
        self.restart()

    def restart(self) -> None:
        self.obj: Any
        if self.kind == ".xz":
            self.obj = lzma.LZMADecompressor()
        elif self.kind == ".gz":
            self.obj = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        elif self.kind == ".zst":
            import zstandard  # Debian's python3-zstandard; only .zst downloads need it

            self.obj = zstandard.ZstdDecompressor().decompressobj()
        else:
            self.obj = None

    def decompress(self, data: bytes) -> bytes:
        try:
            return bytes(self.obj.decompress(data))
        except Exception as e:  # lzma.LZMAError, zlib.error, zstandard.ZstdError
            raise VerificationError(f"not valid {self.kind} data: {e}") from None

    def check_end(self) -> None:
        if self.kind is not None and not self.obj.eof:
            raise VerificationError(f"the {self.kind} stream ends early")


class _Sink:
    """Hashes the download and its content, decompresses into CONTENT (or, for an
    uncompressed download, the partial file is the content)."""

    def __init__(self, name: str, expected: Expected | None, content: Path) -> None:
        self.expected = expected
        self.content = content
        self.decompressor = _Decompressor(name)
        self.out: Any = None
        self.restart()

    @property
    def compressed(self) -> bool:
        return self.decompressor.kind is not None

    def restart(self) -> None:
        # Each byte is hashed once per digest needed: the content's sha256 (its name in
        # the cache) always; the download's only when it is compressed and may be what
        # the sums cover; the content's in another algorithm only when it may be checked.
        exp = self.expected
        self.content_hash = hashlib.sha256()
        self.raw_hash: Any = None
        self.content_check: Any = self.content_hash
        if exp is not None:
            if self.compressed and exp.decompressed is not True:
                self.raw_hash = hashlib.new(exp.algorithm)
            if exp.algorithm != "sha256" and (not self.compressed or exp.decompressed is not False):
                self.content_check = hashlib.new(exp.algorithm)
        self.head = b""
        self.decompressor.restart()
        if self.compressed:
            if self.out is not None:
                self.out.close()
            self.out = open(self.content, "wb")  # noqa: SIM115 (closed by close())

    def feed(self, data: bytes) -> None:
        if self.raw_hash is not None:
            self.raw_hash.update(data)
        content = self.decompressor.decompress(data) if self.compressed else data
        if len(self.head) < 512:
            self.head += content[: 512 - len(self.head)]
        self.content_hash.update(content)
        if self.content_check is not self.content_hash:
            self.content_check.update(content)
        if self.out is not None:
            self.out.write(content)

    def replay(self, part: Path) -> None:
        """Feed what an earlier attempt left in PART (its bytes are not written again)."""
        with open(part, "rb") as f:
            while chunk := f.read(fetch.CHUNK):
                self.feed(chunk)

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None

    def check(self) -> str:
        """What vouched for the bytes (a line for the ref); VerificationError if nothing does."""
        if self.compressed:
            self.decompressor.check_end()
        exp = self.expected
        if exp is None:
            return ""
        candidates = []
        if self.raw_hash is not None:
            candidates.append(self.raw_hash.hexdigest())
        if exp.decompressed is not False or not self.compressed:
            candidates.append(self.content_check.hexdigest())
        if exp.hexdigest not in candidates:
            got = candidates[0]
            raise VerificationError(
                f"digest mismatch: {exp.origin} says {exp}, the download is "
                f"{exp.algorithm}:{got}: nothing kept")
        return f"{exp} from {exp.origin}"


def image_format(head: bytes) -> str:
    """qcow2 or raw; a qcow2 image with a backing file, an external data file or unknown
    incompatible features is refused (it would open host files)."""
    header = qcow2.parse_header(head)
    if header is None:
        return "raw"
    if int.from_bytes(head[8:16], "big") != 0:
        raise VerificationError("a qcow2 image with a backing file is refused")
    if (problem := header.problem()) is not None:
        raise VerificationError(f"{problem}: refused")
    return "qcow2"


def expected(src: ImageSource, cache: Cache, retry: fetch.Retry) -> Expected | None:
    """What the image must hash to, from ImageChecksum= or the (signed) sums file."""
    if src.checksum:
        return verify.expected_from_checksum(src.checksum)
    if not src.checksums:
        return None
    text = fetch.fetch_small(src.checksums, retry)
    if src.keyring is not None:
        with _tmp_files(cache, "sums", "sig") as (sums_path, sig_path):
            sums_path.write_bytes(text)
            signature = None
            if src.signature:
                sig_path.write_bytes(fetch.fetch_small(src.signature, retry))
                signature = sig_path
            elif not text.lstrip().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
                raise VerificationError(f"{src.checksums} is not clear-signed: give "
                                        "ImageSignature= (the detached signature)")
            verify.verify_signature(sums_path, signature, src.keyring)
    return verify.expected_from_sums(src, text.decode("utf-8", errors="replace"))


@contextlib.contextmanager
def _tmp_files(cache: Cache, *suffixes: str) -> Any:
    paths = [cache.tmp / f"{os.getpid()}.{s}" for s in suffixes]
    try:
        yield paths
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def pull(src: ImageSource, cache: Cache | None = None, *, update: bool = False,
         progress: Progress | None = None, retry: fetch.Retry = fetch.DEFAULT_RETRY) -> Ref:
    """The cache's ref of SRC, pulled now unless the cache has it (UPDATE: re-read the
    sums and pull a new digest if they changed)."""
    src.check()
    cache = cache or Cache()
    cache.ensure()
    key = src.key()
    with cache.locked(key):
        old = cache.read_ref(key)
        if old is not None and cache.blob(old.digest).exists() and not update:
            return old
        try:
            ref = _pull_locked(src, cache, key, old, progress or _no_progress, retry)
        except QemuUnitError as e:
            # Bytes nobody vouches for stay wrong on a retry: the waiting VMs must not
            # restart into the same pull (wait_for_pull ends them with EX_CONFIG).
            cache.write_progress(key, error=str(e),
                                 permanent=isinstance(e, verify.VerificationError))
            raise
        except OSError as e:
            if is_disk_full(e):
                message = f"no space left in {cache.root} while pulling {src.url}: nothing kept"
                cache.write_progress(key, error=message)
                raise QemuUnitError(message) from None
            cache.write_progress(key, error=f"{src.url}: {e}")
            raise
        cache.clear_progress(key)
        return ref


def _no_progress(done: int, total: int | None) -> None:
    pass


def _pull_locked(src: ImageSource, cache: Cache, key: str, old: Ref | None,
                 progress: Progress, retry: fetch.Retry) -> Ref:
    want = expected(src, cache, retry)
    if old is not None and want is not None and old.verified.startswith(f"{want} ") \
            and cache.blob(old.digest).exists():
        return old  # the sums still vouch for what we have
    part = cache.tmp / f"{key}.part"
    content = cache.tmp / f"{key}.content"
    sink = _Sink(src.file_name, want, content)
    keep_part = False
    try:
        if part.exists():
            sink.replay(part)

        fetch.download(src.url, part, sink, progress, retry)
        sink.close()
        verified = sink.check()
        fmt = image_format(sink.head)
        digest = "sha256:" + sink.content_hash.hexdigest()
        stored = content if sink.compressed else part
        os.chmod(stored, 0o444)
        with open(stored, "rb") as f:
            os.fsync(f.fileno())
        blob = cache.blob(digest)
        os.replace(stored, blob)  # the one step that makes it visible
        size = blob.stat().st_size
    except fetch.FetchError:
        keep_part = True  # the next pull resumes from it
        raise
    finally:
        sink.close()
        content.unlink(missing_ok=True)
        if not keep_part:
            part.unlink(missing_ok=True)
            part.with_name(part.name + ".json").unlink(missing_ok=True)
    previous = old.digest if old is not None and old.digest != digest else (
        old.previous if old is not None else None)
    ref = Ref(src, digest, fmt, size, verified, time.time(), previous)
    cache.write_ref(key, ref)
    return ref
