"""`qemu-unit image pull|list|prune|rm`: the operator's side of the image cache."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemu_unit import paths
from qemu_unit.config import settings, source
from qemu_unit.config.imagesource import ImageSource
from qemu_unit.errors import QemuUnitError
from qemu_unit.images.cache import Cache, Ref


def pull(src: ImageSource, cache: Cache, *, update: bool = False) -> Ref:
    from qemu_unit.images import progress
    from qemu_unit.images.pull import pull as pull_image
    from qemu_unit.vm.notify import Notifier

    notifier = Notifier()
    reporter = progress.Reporter(cache, src.key(), src.url,
                                 notify=notifier if notifier.enabled else None)
    try:
        ref = pull_image(src, cache, update=update, progress=reporter)
    finally:
        reporter.close()
    if notifier.enabled:
        notifier.status(f"Pulled {src.url}: {ref.digest}")
    return ref


@dataclass
class Entry:
    """One blob of the cache and what refers to it."""

    digest: str
    path: Path
    size: int
    sources: list[str] = field(default_factory=list)
    vms: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"digest": self.digest, "path": str(self.path), "size": self.size,
                "sources": self.sources, "vms": self.vms}


def _overlay_base(name: str) -> Path | None:
    """The backing file of VM NAME's kept overlay, if it has one."""
    from qemu_unit.vm import qcow2

    path = paths.finalize_dirs(name).state / paths.OVERLAY
    with contextlib.suppress(OSError):
        header = qcow2.read_header(path)
        if header is not None and header.backing_file:
            return Path(header.backing_file)
    return None


def vm_digests(cache: Cache, search_path: Sequence[Path] | None = None) -> dict[str, set[str]]:
    """{VM name: digests it uses}: its Image= source as resolved now, a blob named by
    path, and the base of its kept overlay (which must outlive any update)."""
    refs = cache.all_refs()
    used: dict[str, set[str]] = {}
    for src in source.list_sources(search_path):
        digests: set[str] = set()
        with contextlib.suppress(QemuUnitError, OSError):
            vm = settings.load_vm(src)
            if vm.image_source is not None:
                ref = refs.get(vm.image_source.key())
                if ref is not None:
                    digests.add(ref.digest)
            elif vm.image is not None and (d := cache.digest_of(vm.image)):
                digests.add(d)
        if (base := _overlay_base(src.name)) is not None and (d := cache.digest_of(base)):
            digests.add(d)
        if digests:
            used[src.name] = digests
    return used


def entries(cache: Cache, search_path: Sequence[Path] | None = None) -> list[Entry]:
    used = vm_digests(cache, search_path)
    refs = cache.all_refs()
    out = []
    for path in cache.list_blobs():
        digest = cache.digest_of(path) or ""
        with contextlib.suppress(OSError):
            out.append(Entry(
                digest, path, path.stat().st_size,
                sorted({r.source.url for r in refs.values() if r.digest == digest}),
                sorted(name for name, ds in used.items() if digest in ds)))
    return out


def list_text(items: list[Entry]) -> str:
    if not items:
        return "no images\n"
    lines = [f"{'DIGEST':<19} {'SIZE':>9}  {'VMS':<20} SOURCE"]
    for e in items:
        lines.append(f"{e.digest[:19]:<19} {e.size / 2**20:>7.1f}Mi  "
                     f"{','.join(e.vms) or '-':<20} {' '.join(e.sources) or '-'}")
    return "\n".join(lines) + "\n"


def list_json(items: list[Entry]) -> str:
    return json.dumps({"version": 1, "images": [e.as_dict() for e in items]}, indent=1)


def prune(cache: Cache, search_path: Sequence[Path] | None = None, *,
          dry_run: bool = False) -> list[Entry]:
    """Remove every blob no VM uses (and the refs resolving to it); what was removed."""
    gone = [e for e in entries(cache, search_path) if not e.vms]
    if not dry_run:
        for e in gone:
            cache.remove_blob(e.digest)
    return gone


def resolve(cache: Cache, target: str) -> str:
    """A digest (or a unique prefix of one) or a source URL -> the digest."""
    refs = cache.all_refs()
    by_url = {r.digest for r in refs.values() if r.source.url == target}
    if len(by_url) == 1:
        return by_url.pop()
    wanted = target if ":" in target else f"sha256:{target}"
    found = [cache.digest_of(p) for p in cache.list_blobs()]
    matches = [d for d in found if d and d.startswith(wanted)]
    if len(matches) != 1:
        raise QemuUnitError(f"{target}: {'no' if not matches else 'more than one'} image "
                            "in the cache matches")
    return matches[0]


def remove(cache: Cache, targets: Sequence[str], search_path: Sequence[Path] | None = None, *,
           force: bool = False) -> list[str]:
    used = vm_digests(cache, search_path)
    digests = [resolve(cache, t) for t in targets]
    for digest in digests:
        users = sorted(n for n, ds in used.items() if digest in ds)
        if users and not force:
            raise QemuUnitError(f"{digest} is used by {', '.join(users)} (--force removes it "
                                "anyway; those VMs pull again on their next start)")
    for digest in digests:
        cache.remove_blob(digest)
    return digests


def source_from_args(args: argparse.Namespace) -> ImageSource:
    return ImageSource(
        url=args.url, checksum=args.checksum,
        checksums=args.checksums, signature=args.signature,
        keyring=Path(os.path.abspath(k)) if (k := args.keyring) else None,
        verify=not args.no_verify)


def print_ref(cache: Cache, ref: Ref) -> None:
    """The blob's path on stdout (for scripts), what it is on stderr."""
    print(f"{ref.digest} {ref.format}, {ref.size} bytes, "
          f"{ref.verified or 'not verified (--no-verify)'}", file=sys.stderr)
    print(cache.blob(ref.digest))
