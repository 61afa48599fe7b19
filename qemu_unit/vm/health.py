"""Health checks (HealthCmd= and friends, Podman's meaning) run by the guest agent.

A `Checker` thread runs HealthCmd= through the agent (agent.Agent.run: bounded
output and time) every HealthInterval=, keeps the state (starting, healthy,
unhealthy), the failing streak and the last output, and hands each change of state
to the runner's event queue as ("health", Health); the main loop decides what
follows (READY=1, STATUS=, HealthOnFailure=). A check blocks only this thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qemu_unit.vm.agent import Agent
from qemu_unit.vm.control import ControlError
from qemu_unit.vm.events import HealthChecked
from qemu_unit.vm.status import Health

STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"
# The last output kept (characters), as one line.
MAX_OUTPUT = 500


def one_line(text: str) -> str:
    """Output as one bounded line (the guest chooses it)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_OUTPUT else flat[: MAX_OUTPUT - 1] + "…"


@dataclass(frozen=True)
class Result:
    ok: bool
    exit_code: int | None
    output: str


def run_check(agent: Agent, command: str, timeout: float) -> Result:
    """One check: COMMAND in the guest; a failure to run it is a failed check."""
    try:
        result = agent.run(["/bin/sh", "-c", command], timeout=timeout)
    except ControlError as e:
        return Result(False, None, one_line(e.message))
    text = (result.stdout + result.stderr).decode(errors="replace")
    return Result(result.status == 0, result.status, one_line(text))


def advance(health: Health, result: Result, in_start_period: bool, retries: int,
            now: float) -> Health:
    """The state after one check (Podman's rules): a pass is healthy and ends the start
    period; a failure during the start period does not count; RETRIES failures in a row
    are unhealthy."""
    base = health._replace(last_output=result.output, last_exit_code=result.exit_code,
                           last_check=now, checks=health.checks + 1)
    if result.ok:
        return base._replace(status=HEALTHY, failing_streak=0)
    if in_start_period and health.status == STARTING:
        return base
    streak = health.failing_streak + 1
    return base._replace(failing_streak=streak,
                         status=UNHEALTHY if streak >= retries else health.status)


class Checker:
    """The health check thread of one VM."""

    def __init__(self, vm: Any, domain: Callable[[], Any],
                 post: Callable[[HealthChecked], None]) -> None:
        self.vm = vm
        self.domain = domain
        self.post = post
        self.health = Health()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def restart(self) -> None:
        """The guest reboots: starting again, with a new start period."""
        self.started = time.monotonic()
        self.health = self.health._replace(status=STARTING, failing_streak=0)

    def _run(self) -> None:
        vm = self.vm
        while not self._stop.is_set():
            try:
                agent = Agent(self.domain(), timeout=max(1, int(vm.health_timeout)))
                result = run_check(agent, vm.health_cmd, vm.health_timeout)
            except ControlError as e:
                result = Result(False, None, one_line(e.message))
            if self._stop.is_set():
                return
            now = time.monotonic()
            in_start = now - self.started < vm.health_start_period
            before = self.health
            self.health = advance(before, result, in_start, vm.health_retries, time.time())
            self.post(HealthChecked(self.health, before.status))
            self._stop.wait(vm.health_interval)
