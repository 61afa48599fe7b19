"""startup: the cyclic collector paused for a process's start, resumed once it is over."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from qemu_unit import startup


def test_resume_freezes_what_the_start_made_and_turns_the_collector_on() -> None:
    frozen = gc.get_freeze_count()
    startup.pause()
    try:
        assert not gc.isenabled()
        made = [[] for _ in range(100)]
        startup.resume()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
        again = gc.get_freeze_count()
        startup.resume()  # once is enough: nothing is frozen twice
        assert gc.get_freeze_count() == again
    finally:
        gc.enable()
        gc.unfreeze()


def test_resume_leaves_a_process_that_never_paused_alone() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    startup.resume()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_the_command_imports_without_a_collection(tmp_path: Path) -> None:
    """The console script's main(): no collection before the command's start is over
    (each one seen records the freeze count: 0 is before resume), the collector on after."""
    (tmp_path / "x.vm").write_text("[VM]\nKernel=/dev/null\n")
    code = (
        "import gc, sys\n"
        "from qemu_unit.cli import main\n"
        "seen = []\n"
        "gc.callbacks.append(lambda phase, _info: phase == 'start'"
        " and seen.append(gc.get_freeze_count()))\n"
        f"sys.argv = ['qemu-unit', 'validate', {str(tmp_path / 'x.vm')!r}]\n"
        "status = main()\n"
        "print(status, gc.isenabled(), [n for n in seen if n == 0], gc.get_freeze_count() > 1000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "0 True [] True\n", out.stderr
