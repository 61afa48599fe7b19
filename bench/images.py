"""Image pulls against `curl -o` and `sha256sum`, from one loopback server, in one run.

    flock /run/qemu-unit-vmtests.lock python3 bench/images.py [--size-mib 1024] [--rounds 3]

A file of SIZE MiB is served by tests/support/imageserver.py on 127.0.0.1 (the same
server for every client). Per round: `curl -s -o FILE URL`; `qemu-unit image pull`'s
code (`pull()`: download, sha256 of the content for its name in the cache, the checksum
check, fsync, rename) with ImageChecksum=sha256; the same with sha512 (a second digest
over every byte); `sha256sum FILE`; the same .xz'ed (level 0) and .zst'ed (level 3)
downloads decompressed on the way. Prints medians and the ratios: throughput of
pull against curl (goal >= 0.9x), verification (pull - curl) against sha256sum.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qemu_unit.config.imagesource import ImageSource  # noqa: E402
from qemu_unit.images.cache import Cache  # noqa: E402
from qemu_unit.images.pull import pull  # noqa: E402
from tests.support.imageserver import ImageServer  # noqa: E402


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def make_file(path: Path, size: int) -> None:
    """Data that compresses somewhat, as disk images do: random blocks and zero runs."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(block[: (1 << 19)] + bytes(1 << 19) if i % 2 else block)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qemu-unit-bench-", dir="/var/tmp"))
    try:
        image = tmp / "image.raw"
        make_file(image, args.size_mib << 20)
        with open(image, "rb") as f:
            s256 = hashlib.file_digest(f, "sha256").hexdigest()
        with open(image, "rb") as f:
            s512 = hashlib.file_digest(f, "sha512").hexdigest()
        subprocess.run(["xz", "-0", "-T0", "-k", str(image)], check=True)
        subprocess.run(["zstd", "-q", "-3", "-T0", "-k", str(image)], check=True)
        results: dict[str, list[float]] = {}
        with ImageServer() as srv:
            for name in ("image.raw", "image.raw.xz", "image.raw.zst"):
                srv.files[f"/{name}"] = tmp / name

            def run_pull(url: str, checksum: str) -> None:
                cache_dir = tmp / "cache"
                shutil.rmtree(cache_dir, ignore_errors=True)
                pull(ImageSource(url, checksum=checksum), Cache(cache_dir))

            cases = {
                "curl -o": lambda: subprocess.run(
                    ["curl", "-sf", "-o", str(tmp / "curl.out"), srv.url("/image.raw")],
                    check=True),
                "pull sha256": lambda: run_pull(srv.url("/image.raw"), f"sha256:{s256}"),
                "pull sha512": lambda: run_pull(srv.url("/image.raw"), f"sha512:{s512}"),
                "sha256sum": lambda: subprocess.run(["sha256sum", str(image)], check=True,
                                                    capture_output=True),
                "pull .xz": lambda: run_pull(srv.url("/image.raw.xz"), f"sha256:{s256}"),
                "pull .zst": lambda: run_pull(srv.url("/image.raw.zst"), f"sha256:{s256}"),
            }
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    results.setdefault(name, []).append(timed(fn))
                    (tmp / "curl.out").unlink(missing_ok=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        size = args.size_mib
        print(f"{size} MiB, {args.rounds} rounds, medians (MiB/s):")
        for name, t in med.items():
            print(f"  {name:<12} {t:7.2f} s  {size / t:8.1f} MiB/s")
        print(f"pull sha256 throughput vs curl -o: {med['curl -o'] / med['pull sha256']:.2f}x "
              "(goal >= 0.9x)")
        print(f"verification (pull sha256 - curl) vs sha256sum: "
              f"{(med['pull sha256'] - med['curl -o']) / med['sha256sum']:.2f}x")
        print(f"sha512 check on top vs sha256sum: "
              f"{(med['pull sha512'] - med['pull sha256']) / med['sha256sum']:.2f}x")
        xz, zst = (tmp / "image.raw.xz").stat().st_size, (tmp / "image.raw.zst").stat().st_size
        print(f"compressed downloads: .xz {xz >> 20} MiB, .zst {zst >> 20} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
