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
        monkeypatch.delenv(var, raising=False)
    runner.become_service_user("web")
    return parents


def test_the_hand_over_takes_no_permission_from_a_parent(handed_over: dict[str, Path]) -> None:
    """A RUNTIME_DIRECTORY= under /tmp made /tmp root's alone (0755): every other user
    lost their temporary files' directory. Parents only gain read and search."""
    modes = {name: path.stat().st_mode & 0o7777 for name, path in handed_over.items()}
    assert modes == {"sticky": 0o1777, "private": 0o755, "open": 0o775}
    assert os.environ["RUNTIME_DIRECTORY"] == str(handed_over["private"] / "run")
