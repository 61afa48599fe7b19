"""The operator's side: the `qemu-unit` command (`commands`, `arguments`), `list`/`status`
(`overview`), `console` (`attach`), `install`/`uninstall` (`install`), `demo` and the man
pages (`manpages`). May import every other package.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The `qemu-unit` command (commands.main). In a process of its own (ARGV None: the
    console script, `python -m qemu_unit`) it imports without the cyclic collector, which
    the command resumes once its start is over (startup)."""
    if argv is None:
        from qemu_unit import startup

        startup.pause()
    from qemu_unit.cli import commands

    return commands.main(argv)


__all__ = ["main"]
