"""The skip policy: only a developer's explicit opt-in skips, and never on CI."""

from __future__ import annotations

import pytest

from tests.support.requirements import skipping_allowed


@pytest.mark.parametrize(
    ("skip", "ci", "allowed"),
    [(None, None, False), ("1", None, True), ("1", "true", False), ("0", None, False)],
)
def test_skipping_allowed(
    monkeypatch: pytest.MonkeyPatch, skip: str | None, ci: str | None, allowed: bool
) -> None:
    for var, value in (("QEMU_UNIT_SKIP_SYSTEM", skip), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert skipping_allowed() is allowed
