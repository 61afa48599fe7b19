"""`systemd-analyze security`'s verdict, read the same way by every test that checks one."""

from __future__ import annotations


def exposure(output: str, unit: str) -> float:
    """The overall exposure level `systemd-analyze security UNIT` printed in OUTPUT."""
    return float(output.rsplit(f"Overall exposure level for {unit}:", 1)[1].split()[0])
