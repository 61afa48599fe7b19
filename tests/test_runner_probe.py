"""MonitorProbe: a question QEMU's monitor leaves unanswered is measured, not waited for."""

from __future__ import annotations

import threading
import time

import libvirt

from qemu_unit.vm.runner import HANG_FLOOR, MonitorProbe


class FakeDomain:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.called = threading.Event()  # the probe's thread is inside the question
        self.calls = 0

    def ioThreadInfo(self) -> list[object]:  # noqa: N802 - libvirt's name
        self.calls += 1
        self.called.set()
        self.release.wait(30)
        if self.calls == 2:
            raise libvirt.libvirtError("domain is not running")
        return []


def _answered(probe: MonitorProbe) -> bool:
    deadline = time.monotonic() + 30
    while probe.unanswered_for() and time.monotonic() < deadline:
        time.sleep(0.01)
    return probe.unanswered_for() == 0.0


def test_unanswered_question_ages_and_is_not_asked_twice() -> None:
    dom = FakeDomain()
    probe = MonitorProbe(dom)  # type: ignore[arg-type]
    assert probe.unanswered_for() == 0.0
    probe.ask()
    assert dom.called.wait(30)  # the question is out (however slow the host is)
    first = probe.unanswered_for()
    probe.ask()  # still pending: no second call piles up behind a hung monitor
    assert probe.unanswered_for() >= first > 0.0
    assert dom.calls == 1
    dom.release.set()
    assert _answered(probe)


def test_an_error_counts_as_an_answer() -> None:
    dom = FakeDomain()
    dom.release.set()
    probe = MonitorProbe(dom)  # type: ignore[arg-type]
    for _ in range(2):
        probe.ask()
        assert _answered(probe)
    assert dom.calls == 2


def test_hang_threshold_has_a_floor_for_short_watchdogs() -> None:
    # WatchdogSec=1s pings every 0.5 s: a loaded host must not make that a hang.
    assert MonitorProbe.hang_threshold(0.5) == HANG_FLOOR
    assert MonitorProbe.hang_threshold(30.0) == 27.0  # WatchdogSec=60s: about half
