"""A process's start without Python's cyclic garbage collector.

The imports and the first steps of a start allocate ~15,000 objects that live as long as
the process and make next to no cyclic garbage (~190 objects over `run`'s imports); the
collector still looks at them ~28 times while they are made (gen0 every 700
allocations, gen1 every tenth of those): ~4 ms of every `qemu-unit` command (README,
issue 21). The console script pauses it before it imports (`cli.main`); `resume()` once
the start is over moves everything alive into the permanent generation (gc.freeze: never
looked at again) and lets the collector run as usual. The generator's scripts switch it
off themselves and never resume it: one short run, then exit (generator.main).
"""

from __future__ import annotations

import gc


def pause() -> None:
    gc.disable()


def resume() -> None:
    """The collector back on; a no-op when it was not paused (a caller's own process,
    tests), or when it already runs."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
