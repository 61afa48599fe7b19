"""The one policy for tests that need something the machine lacks: fail, never skip silently.

A developer may set QEMU_UNIT_SKIP_SYSTEM=1 to skip such tests on purpose; on CI
(CI=true) that variable is ignored, so a green CI run means every test ran.
"""

from __future__ import annotations

import os
import shutil

import pytest


def skipping_allowed() -> bool:
    return os.environ.get("QEMU_UNIT_SKIP_SYSTEM") == "1" and os.environ.get("CI") != "true"


def unavailable(why: str, fix: str) -> None:
    """Fail (or, on a developer's explicit request, skip) because WHY; FIX says what helps."""
    if skipping_allowed():
        pytest.skip(f"{why} (QEMU_UNIT_SKIP_SYSTEM=1)")
    pytest.fail(f"{why}. {fix}, or set QEMU_UNIT_SKIP_SYSTEM=1 to skip on purpose "
                "(ignored when CI=true).", pytrace=False)


def require_tools(*tools: str, fix: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)}", fix)
