"""What the runner's main loop hears: small typed records, handled there with `match`.
NamedTuples, and plain classes for those that carry nothing (an empty tuple would be
false and equal to any other): a dataclass costs ~0.5 ms to make at every start.

Every source (signal handlers, libvirt's event thread, console and agent watchers, the
control socket's handlers) puts one of these on Runner.events; only the main loop acts.
"""

from __future__ import annotations

from collections.abc import Callable

from qemu_unit.records import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # The runner imports the status module only once createXML runs (LATE_MODULES).
    from qemu_unit.vm.status import Health


class Lifecycle(NamedTuple):
    """A libvirt lifecycle event (VIR_DOMAIN_EVENT_*) and its detail."""

    event: int
    detail: int


class Rebooted:
    """The guest rebooted (libvirt's reboot event)."""

    __slots__ = ()


class DiskError(NamedTuple):
    """An I/O error on a disk: what libvirt did (VIR_DOMAIN_EVENT_IO_ERROR_*) and why."""

    device: str
    action: int
    reason: str


class GuestReady:
    """Ready=console matched, or Ready=agent's agent answered."""

    __slots__ = ()


class Signalled(NamedTuple):
    signum: int


class HealthChecked(NamedTuple):
    """A HealthCmd= check ended (vm/health.py): the state now, and the one before."""

    health: Health
    before: str


class StopRequested(NamedTuple):
    """Stop as on SIGTERM, for REASON (HealthOnFailure=stop)."""

    reason: str


class Tick:
    """Nothing arrived before the next deadline."""

    __slots__ = ()


class SaveRequested(NamedTuple):
    """`qemu-unit save` (the control socket's "save"): save the VM, then stop. REPLY gets
    the outcome: {"size": ..., "dir": ...} or {"error": ...}."""

    reply: Callable[[dict[str, Any]], None]


Event = (Lifecycle | Rebooted | DiskError | GuestReady | Signalled | HealthChecked
         | StopRequested | Tick | SaveRequested)
