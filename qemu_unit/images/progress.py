"""Where a pull's progress is shown: a tqdm bar on a terminal, STATUS= under systemd,
and always the cache's progress file, which VM units waiting for the pull read."""

from __future__ import annotations

import sys
import time
from typing import Any

from qemu_unit.images.cache import Cache

INTERVAL = 1.0  # seconds between two STATUS= or progress-file updates


def describe(done: int, total: int | None) -> str:
    """'123.4 MiB of 500.0 MiB (24%)' for STATUS= lines."""
    text = f"{done / 2**20:.1f} MiB"
    if total:
        text += f" of {total / 2**20:.1f} MiB ({100 * done // total}%)"
    return text


class Reporter:
    """The progress callback of one pull (see pull.pull)."""

    def __init__(self, cache: Cache, key: str, url: str, *, terminal: bool | None = None,
                 notify: Any = None) -> None:
        self.cache, self.key, self.url = cache, key, url
        self.notify = notify
        self.bar: Any = None
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if self.terminal:
            if self.bar is None:
                from tqdm import tqdm  # Debian's python3-tqdm

                self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                desc=self.url.rsplit("/", 1)[-1][:40], file=sys.stderr)
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)
        now = time.monotonic()
        if now - self.last < INTERVAL and done != total:
            return
        self.last = now
        self.cache.write_progress(self.key, url=self.url, done=done, total=total)
        if self.notify is not None:
            self.notify.status(f"Pulling {self.url}: {describe(done, total)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
