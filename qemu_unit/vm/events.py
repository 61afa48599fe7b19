"""What the runner's main loop hears: small typed records, handled there with `match`.

Every source (signal handlers, libvirt's event thread, console and agent watchers, the
control socket's handlers) puts one of these on Runner.events; only the main loop acts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # The runner imports the status module only once createXML runs (LATE_MODULES).
    from qemu_unit.vm.status import Health


@dataclass(frozen=True)
class Lifecycle:
    """A libvirt lifecycle event (VIR_DOMAIN_EVENT_*) and its detail."""

    event: int
    detail: int


@dataclass(frozen=True)
class Rebooted:
    pass


@dataclass(frozen=True)
class DiskError:
    """An I/O error on a disk: what libvirt did (VIR_DOMAIN_EVENT_IO_ERROR_*) and why."""

    device: str
    action: int
    reason: str


@dataclass(frozen=True)
class GuestReady:
    """Ready=console matched, or Ready=agent's agent answered."""


@dataclass(frozen=True)
class Signalled:
    signum: int


@dataclass(frozen=True)
class HealthChecked:
    """A HealthCmd= check ended (vm/health.py): the state now, and the one before."""

    health: Health
    before: str


@dataclass(frozen=True)
class StopRequested:
    """Stop as on SIGTERM, for REASON (HealthOnFailure=stop)."""

    reason: str


@dataclass(frozen=True)
class Tick:
    """Nothing arrived before the next deadline."""


@dataclass(frozen=True)
class SaveRequested:
    """`qemu-unit save` (the control socket's "save"): save the VM, then stop. REPLY gets
    the outcome: {"size": ..., "dir": ...} or {"error": ...}."""

    reply: Callable[[dict[str, Any]], None]


Event = (Lifecycle | Rebooted | DiskError | GuestReady | Signalled | HealthChecked
         | StopRequested | Tick | SaveRequested)
