"""qemu-run@NAME.service under a real systemd (nspawn), real libvirt embed driver, real QEMU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.security import exposure
from tests.support.vm import (
    assert_graceful_stop,
    cold_cache,
    console,
    install_qemu_unit,
    invocation,
    prop,
    put_file,
    qemu_pids,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

BAD_XML = "<domain type='qemu'><name>x</name><memory>1024</memory>\n<devices>\n"
BROKEN = vm_text("wait", vm="Memroy=1G")  # a typo of a key, not a value


def prepare(upper: Path) -> None:
    stage_guest(upper)
    write_vm(upper, "web", vm_text("wait"))
    write_vm(upper, "crashy", vm_text("wait"))
    write_vm(upper, "off", vm_text("poweroff"))
    write_vm(upper, "stubborn", vm_text("ignore", vm="ShutdownTimeout=3s"))
    write_vm(upper, "rb", vm_text("reboot", vm="ShutdownTimeout=5s"))
    write_vm(upper, "kvm", vm_text("wait", vm="Accel=kvm"))
    write_vm(upper, "broken", BROKEN)
    write_vm(upper, "nokernel", vm_text("wait").replace("/vmlinuz", "/no-such-kernel"))
    write_vm(upper, "badxml", BAD_XML, suffix=".xml")


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("runner", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        yield ct


def active(ct: Container, unit: str) -> bool:
    return prop(ct, unit, "ActiveState") == "active"


def stop_all(ct: Container, *vms: str) -> None:
    for vm in vms:
        ct.systemctl("stop", f"qemu-run@{vm}", check=False)


def test_start_runs_vm_in_unit_cgroup_with_journal(ct: Container) -> None:
    unit = "qemu-run@web.service"
    ct.systemctl("start", unit)
    this = invocation(ct, "web")
    try:
        assert active(ct, unit)
        assert prop(ct, unit, "StatusText").startswith("Running")
        [pid] = qemu_pids(ct, "web")
        cgroup = prop(ct, unit, "ControlGroup")
        assert cgroup.endswith("/qemu-run@web.service")
        # QEMU is in the unit's own cgroup (libvirt as root would have moved it out).
        own = ct.run("cat", f"/proc/{pid}/cgroup").stdout
        assert f"{cgroup}\n" in own, f"QEMU {pid} not in {cgroup}: {own}"
        # A user of its own (DynamicUser=), not the template's "qemu-run".
        assert ct.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip() == "qemu-vm-web"
        wait_for("guest boot", lambda: "qemu-unit-guest: booted" in console(ct, "web"))
        # Runner lines carry the structured fields; console lines are selected by -t.
        tagged = ct.journal("-u", unit, "QEMU_UNIT_VM=web", "-t", "qemu-unit", "-o", "cat")
        assert "Started VM web" in tagged
        uuid = ct.journal("-u", unit, "-t", "qemu-unit", "-o", "verbose", "-n", "1")
        assert "QEMU_UNIT_UUID=" in uuid
        assert "qemu-unit-guest:" not in runner_log(ct, "web")
    finally:
        ct.systemctl("stop", unit)
    assert_graceful_stop(ct, "web", this)
    assert "destroy" not in runner_log(ct, "web", this).lower()


def test_guest_poweroff_ends_unit_successfully(ct: Container) -> None:
    unit = "qemu-run@off.service"
    ct.systemctl("start", unit)
    wait_for("unit inactive", lambda: prop(ct, unit, "ActiveState") == "inactive")
    assert "qemu-unit-guest: powering off" in console(ct, "off")
    assert prop(ct, unit, "Result") == "success"
    assert prop(ct, unit, "ExecMainStatus") == "0"
    assert prop(ct, unit, "NRestarts") == "0"
    assert qemu_pids(ct, "off") == []


def test_sigkill_of_runner_leaves_no_qemu_and_restarts(ct: Container) -> None:
    unit = "qemu-run@web.service"
    ct.systemctl("start", unit)
    try:
        [old_qemu] = qemu_pids(ct, "web")
        main = prop(ct, unit, "MainPID")
        ct.run("kill", "-9", main)
        wait_for("old QEMU gone", lambda: old_qemu not in qemu_pids(ct, "web"))
        # Restart=on-failure brings it back on the same (stale) root.
        wait_for(
            "restart",
            lambda: active(ct, unit) and prop(ct, unit, "MainPID") != main,
            timeout=30,
        )
        assert int(prop(ct, unit, "NRestarts")) >= 1
        [new_qemu] = qemu_pids(ct, "web")
        assert new_qemu != old_qemu
    finally:
        ct.systemctl("stop", unit)
    assert qemu_pids(ct, "web") == []
    # And an explicit new start after a stop works too.
    ct.systemctl("start", unit)
    assert active(ct, unit)
    ct.systemctl("stop", unit)


def test_stubborn_guest_destroyed_after_shutdown_timeout(ct: Container) -> None:
    unit = "qemu-run@stubborn.service"
    ct.systemctl("start", unit)
    wait_for("guest boot", lambda: "ignoring power button" in console(ct, "stubborn"))
    start = time.monotonic()
    ct.systemctl("stop", unit)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 20, elapsed
    assert "qemu-unit-guest: power button pressed" in console(ct, "stubborn")
    assert "did not shut down within 3s" in runner_log(ct, "stubborn")
    assert prop(ct, unit, "ActiveState") == "inactive"
    assert qemu_pids(ct, "stubborn") == []


def test_guest_reboot_stays_in_the_same_unit(ct: Container) -> None:
    unit = "qemu-run@rb.service"
    ct.systemctl("start", unit)
    try:
        main = prop(ct, unit, "MainPID")
        wait_for(
            "second boot",
            lambda: console(ct, "rb").count("qemu-unit-guest: booted") >= 2,
            timeout=60,
        )
        assert "qemu-unit-guest: rebooting" in console(ct, "rb")
        assert active(ct, unit)
        assert prop(ct, unit, "MainPID") == main
        assert "Guest rebooted" in runner_log(ct, "rb")
    finally:
        ct.systemctl("stop", unit)
    assert qemu_pids(ct, "rb") == []


def test_qemu_crash_fails_and_restart_brings_it_back(ct: Container) -> None:
    unit = "qemu-run@crashy.service"
    ct.systemctl("start", unit)
    try:
        [pid] = qemu_pids(ct, "crashy")
        ct.run("kill", "-9", str(pid))
        wait_for("failure logged", lambda: "QEMU exited unexpectedly" in runner_log(ct, "crashy"))
        wait_for(
            "restart",
            lambda: int(prop(ct, unit, "NRestarts") or 0) >= 1 and active(ct, unit),
            timeout=30,
        )
        assert qemu_pids(ct, "crashy") not in ([], [pid])
    finally:
        ct.systemctl("stop", unit)


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        ("missing", "missing"),
        ("broken", "broken.vm:"),
        ("badxml", "badxml.xml"),
        ("nokernel", "no-such-kernel"),
        ("kvm", "KVM requested but unusable"),
        ("a\\x2fb", "VM name"),
    ],
)
def test_bad_input_exits_78_without_restart_loop(
    ct: Container, instance: str, expected: str
) -> None:
    unit = f"qemu-run@{instance}.service"
    result = ct.systemctl("start", unit, check=False)
    assert result.returncode != 0
    assert prop(ct, unit, "ExecMainStatus") == "78"
    status = prop(ct, unit, "StatusText")
    assert status.startswith("Failed:") and expected in status, status
    time.sleep(3)  # longer than RestartSec=: a restart would have happened by now
    assert prop(ct, unit, "NRestarts") == "0"
    assert prop(ct, unit, "ActiveState") == "failed"
    lines = ct.journal("-u", unit, "-t", "qemu-unit", "-p", "err", "-o", "cat").splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    ct.systemctl("reset-failed", unit, check=False)


def test_bad_input_messages_name_file_line_and_key(ct: Container) -> None:
    line = BROKEN.splitlines().index("Memroy=1G") + 1
    ct.systemctl("start", "qemu-run@broken", check=False)
    status = prop(ct, "qemu-run@broken.service", "StatusText")
    assert f"/etc/qemu-run/broken.vm:{line}: Memroy=: unknown key" in status, status
    ct.systemctl("reset-failed", "qemu-run@broken", check=False)


def test_second_runner_on_a_locked_root_exits_78(ct: Container, qemu_unit_bin: Path) -> None:
    unit = "qemu-run@web.service"
    ct.systemctl("start", unit)
    try:
        # As the VM's own (dynamic) user: nobody else may enter its directories.
        uid = ct.run("stat", "-c", "%u", f"/proc/{prop(ct, unit, 'MainPID')}").stdout.strip()
        result = ct.run(
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            str(qemu_unit_bin), "run", "web",
            env={
                "RUNTIME_DIRECTORY": "/run/qemu-run/web",
                "STATE_DIRECTORY": "/var/lib/qemu-run/web",
                "INVOCATION_ID": "test",
            },
            check=False,
        )
        assert result.returncode == 78, result.stderr
        assert "in use by another runner" in result.stderr
        assert active(ct, unit)
    finally:
        ct.systemctl("stop", unit)


def test_capability_probe_is_paid_once_per_host(ct: Container) -> None:
    caps = "/var/cache/qemu-run/qemu/capabilities"
    ct.systemctl("start", "qemu-run@web")
    ct.systemctl("stop", "qemu-run@web")
    before = ct.run("sh", "-c", f"stat -c '%n %Y %s' {caps}/*.xml").stdout
    assert before.strip(), "no capability cache after the first VM"
    ct.systemctl("start", "qemu-run@crashy")
    ct.systemctl("stop", "qemu-run@crashy")
    after = ct.run("sh", "-c", f"stat -c '%n %Y %s' {caps}/*.xml").stdout
    assert after == before


def test_unit_verifies_and_scores_safe(ct: Container) -> None:
    verify = ct.run("systemd-analyze", "verify", "qemu-run@web.service", check=False)
    assert verify.returncode == 0, verify.stderr
    assert "qemu-run@" not in verify.stderr, verify.stderr
    out = ct.run("systemd-analyze", "security", "--no-pager", "qemu-run@x.service").stdout
    assert exposure(out, "qemu-run@x.service") <= 0.9, out[-400:]


def test_three_vms_shut_down_gracefully_on_container_poweroff(qemu_unit_bin: Path) -> None:
    names = ("pa", "pb", "pc")

    def prep(upper: Path) -> None:
        stage_guest(upper)
        for n in names:
            write_vm(upper, n, vm_text("wait"))
        # Persistent journal in the upper layer: readable after the container is gone.
        (upper / "var/log/journal").mkdir(parents=True, exist_ok=True)

    with Container("poweroff", prep) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        ct.systemctl("start", *(f"qemu-run@{n}" for n in names))
        for n in names:
            wait_for(f"{n} boot", lambda n=n: "qemu-unit-guest: booted" in console(ct, n))
        ct.poweroff(timeout=60)
        journal_dir = ct.upper / "var/log/journal"
        for n in names:
            out = _offline_journal(journal_dir, f"qemu-run@{n}.service")
            assert "qemu-unit-guest: power button pressed" in out, out[-2000:]
            assert "the guest powered off" in out
            assert "destroy" not in out.lower()


def _offline_journal(directory: Path, unit: str) -> str:
    import subprocess

    return subprocess.run(
        ["journalctl", "--no-pager", "-D", str(directory), "-u", unit, "-o", "cat"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def test_put_file_then_daemon_reload_sees_new_vm(ct: Container) -> None:
    put_file(ct, "/etc/qemu-run/late.vm", vm_text("poweroff"))
    ct.systemctl("start", "qemu-run@late")
    wait_for("late done", lambda: prop(ct, "qemu-run@late.service", "ActiveState") == "inactive")
    assert prop(ct, "qemu-run@late.service", "Result") == "success"


def test_stop_while_guest_still_boots_is_still_graceful(ct: Container) -> None:
    # The first press lands before the guest listens; the runner presses again.
    unit = "qemu-run@web.service"
    ct.systemctl("start", unit)
    this = invocation(ct, "web")
    ct.systemctl("stop", unit, timeout=90)
    assert "qemu-unit-guest: power button pressed" in console(ct, "web", this)
    assert "destroy" not in runner_log(ct, "web", this).lower()
    assert qemu_pids(ct, "web") == []


def test_cold_cache_concurrent_starts_probe_once(qemu_unit_bin: Path) -> None:
    names = ("ca", "cb", "cc")

    def prep(upper: Path) -> None:
        stage_guest(upper)
        for n in names:
            write_vm(upper, n, vm_text("wait"))
        cold_cache(upper)

    with Container("coldcache", prep) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        assert ct.run("ls", "-A", "/var/cache/qemu-run").stdout.strip() == ""
        ct.systemctl("start", *(f"qemu-run@{n}" for n in names), timeout=120)
        assert all(active(ct, f"qemu-run@{n}.service") for n in names)
        # One probe, by qemu-unit-caps.service; each VM copies its result.
        probes = [n for n in names if "cache is cold: probing" in runner_log(ct, n)]
        assert probes == [], probes
        caps_log = ct.journal("-u", "qemu-unit-caps.service", "-o", "cat")
        assert caps_log.count("cache is cold: probing") == 1, caps_log
        caps = ct.run("sh", "-c", "ls /var/cache/qemu-run/qemu/capabilities/").stdout.split()
        assert len([c for c in caps if c.endswith(".xml")]) == 1, caps
        ct.systemctl("stop", *(f"qemu-run@{n}" for n in names), timeout=120)
