"""The runner started by hand as root: what it does to the host before it drops to the
service user (the unit's own starts never run this)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.vm import runner
from tests.support.requirements import unavailable


@pytest.fixture
def handed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """become_service_user() with the directories under TMP_PATH and the identity change
    recorded instead of done (the test process stays root)."""
    if os.geteuid() != 0:
        unavailable("the hand-over to the service user is root's", "run the tests as root")
    parents = {"sticky": tmp_path / "sticky", "private": tmp_path / "private",
               "open": tmp_path / "open"}
    for path, mode in zip(parents.values(), (0o1777, 0o700, 0o775), strict=True):
        path.mkdir()
        path.chmod(mode)
    dirs = paths.Dirs(state=parents["sticky"] / "state", root=parents["private"] / "run",
                      cache=parents["open"] / "cache", logs=parents["open"] / "logs")
    me = pwd.getpwuid(os.getuid())
    monkeypatch.setattr(runner, "_service_user", lambda _user: me)
    monkeypatch.setattr(paths, "finalize_dirs", lambda _name: dirs)
    for call in ("setgroups", "setgid", "setuid"):
        monkeypatch.setattr(os, call, lambda *_args: None)
    for var in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY",
                "HOME", "USER", "LOGNAME"):
        # Set first, so that what the hand-over sets is undone after the test (delenv
        # of an unset variable records nothing to restore).
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    runner.become_service_user("web")
    return parents


def test_the_hand_over_takes_no_permission_from_a_parent(handed_over: dict[str, Path]) -> None:
    """A RUNTIME_DIRECTORY= under /tmp made /tmp root's alone (0755): every other user
    lost their temporary files' directory. Parents only gain read and search."""
    modes = {name: path.stat().st_mode & 0o7777 for name, path in handed_over.items()}
    assert modes == {"sticky": 0o1777, "private": 0o755, "open": 0o775}
    assert os.environ["RUNTIME_DIRECTORY"] == str(handed_over["private"] / "run")


def test_the_collector_runs_again_once_the_loop_begins(tmp_path: Path) -> None:
    """`qemu-unit run` starts without the cyclic collector (startup.pause in cli.main); the
    runner's loop, reached once the domain is up, turns it back on for the VM's life."""
    import gc

    import libvirt

    from qemu_unit import startup
    from qemu_unit.config import settings, source
    from qemu_unit.vm.events import Lifecycle

    (tmp_path / "x.vm").write_text("[VM]\nKernel=/dev/null\n")
    run = runner.Runner(source.find_source("x", [tmp_path]))
    run.vm = settings.load_vm(run.src)
    run.dom = object()  # type: ignore[assignment]  # the loop only holds it here
    run.events.put(Lifecycle(libvirt.VIR_DOMAIN_EVENT_STOPPED,
                             libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN))
    frozen = gc.get_freeze_count()
    startup.pause()
    try:
        assert run.loop(paths.finalize_dirs("x")) == 0
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen  # what the start made: never looked at again
    finally:
        gc.enable()
        gc.unfreeze()
