"""The operator's side: the `qemu-unit` command (`commands`, `arguments`), `list`/`status`
(`overview`), `console` (`attach`), `install`/`uninstall` (`install`), `demo` and the man
pages (`manpages`). May import every other package.
"""

from qemu_unit.cli.commands import main

__all__ = ["main"]
