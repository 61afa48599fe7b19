"""Session fixtures and the policy for system tests.

System tests (marked `system`, and everything under tests/system/ and tests/stress/) need root,
systemd-nspawn, nsenter and QEMU. When those are missing the tests FAIL: a
green run must mean they ran. A developer who knows may set
QEMU_UNIT_SKIP_SYSTEM=1 to skip them instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# `tests.support` and this tree's qemu_unit, whichever directory pytest starts from.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qemu_unit.cli import demo  # noqa: E402
from tests.support import container  # noqa: E402
from tests.support.guest import build_test_guest  # noqa: E402
from tests.support.requirements import unavailable  # noqa: E402
from tests.support.venv import test_install  # noqa: E402

SYSTEM_DIR = REPO / "tests" / "system"
# Faults and load under a real systemd (issue 10): system tests too.
STRESS_DIR = REPO / "tests" / "stress"
SYSTEM_TOOLS = ("systemd-nspawn", "nsenter", "qemu-system-x86_64", "mount")


def system_test_problems() -> list[str]:
    """Why system tests cannot run here (empty when they can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("they need root (mounts, systemd-nspawn)")
    problems += [f"{tool} is not installed" for tool in SYSTEM_TOOLS if not shutil.which(tool)]
    return problems


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if {SYSTEM_DIR, STRESS_DIR} & set(Path(str(item.path)).parents):
            item.add_marker(pytest.mark.system)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("system") is None:
        return
    problems = system_test_problems()
    if not problems:
        return
    unavailable("system test cannot run: " + "; ".join(problems),
                "Run as root on a machine with systemd-container and qemu-system-x86")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    # A container's journal dies with it: attach it to the report of a failing test
    # while the container (perhaps a module-scoped fixture) still runs.
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for ct in list(container.LIVE):
            if ct.running():
                report.sections.append((f"journal of container {ct.name}", ct.dump_journal()))


@pytest.fixture(scope="session")
def guest() -> demo.Guest:
    """The test guest (tests/support/guest.py), built once and cached under /var/tmp."""
    return build_test_guest()


@pytest.fixture(scope="session")
def qemu_unit_bin() -> Path:
    """bin/qemu-unit of a venv with this tree pip-installed, runnable by a service user."""
    return test_install()


@pytest.fixture(scope="session", autouse=True)
def _private_secret_fixtures() -> None:
    """Fixtures holding SetCredential= values are refused while others can read them
    (settings.check_secret_files); git keeps no modes but the executable bit."""
    for path in (REPO / "tests" / "fixtures").rglob("*"):
        if path.is_file() and not path.is_symlink() and b"SetCredential=" in path.read_bytes():
            path.chmod(path.stat().st_mode & ~0o007)
