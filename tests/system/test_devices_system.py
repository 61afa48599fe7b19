"""TPM= and Share= under a real systemd: a persistent vTPM and virtio-fs shares.

One VM (`dev`, the test guest in mode `devices`) is shared by the tests in order:
first start (the guest sees /dev/tpm0 and both shares; a write through the :ro share
fails on the host side), restart (the TPM's endorsement key is the same; a SIGKILL
of the runner leaves no virtiofsd behind), reset (a new TPM: another key).

The key the guest prints is the digest of TPM2_ReadPublic of the endorsement key
swtpm_setup made persistent: it lives in the TPM's state, so it is the same as long as
the state is, and differs once the state is made anew.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.vm import (
    install_qemu_unit,
    prop,
    qemu_pids,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

SHARES = Path("/srv/qemu-unit-shares")
MANY_FILES = 3000
UNIT = "qemu-run@dev.service"
COMPANIONS = ("qemu-run-virtiofsd@dev:rw.service", "qemu-run-virtiofsd@dev:ro.service")
TPM_STATE = Path("/var/lib/qemu-run/dev/lib/swtpm")
BOOT_TIMEOUT = 180
SEEN: dict[str, str] = {}


def prepare(upper: Path) -> None:
    stage_guest(upper)
    for tag in ("rw", "ro"):
        d = upper / SHARES.relative_to("/") / tag
        d.mkdir(parents=True)
        (d / "hello").write_text(f"hello {tag}\n")
    # More files than systemd's default descriptor limit (1024): virtiofsd keeps one each.
    many = upper / SHARES.relative_to("/") / "rw" / "many"
    many.mkdir()
    for i in range(MANY_FILES):
        (many / str(i)).touch()
    write_vm(upper, "dev", vm_text(
        "devices", cmdline_extra="qemu_unit.shares=rw,ro",
        vm=f"TPM=yes\nShare={SHARES}/rw:rw\nShare={SHARES}/ro:ro:ro",
        # A SIGKILLed runner stays dead: the test looks at what it left behind.
        service="Restart=no",
    ))


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("devices", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        yield ct
        ct.systemctl("stop", UNIT, check=False, timeout=120)


def start(ct: Container) -> dict[str, str]:
    """Start the VM; this start's `devices` report: {'tpm': ..., 'ek': ..., 'share rw': ...}."""
    ct.systemctl("start", UNIT, timeout=120)
    invocation = prop(ct, UNIT, "InvocationID")
    args = ("-u", UNIT, "-t", "qemu-unit-console", f"_SYSTEMD_INVOCATION_ID={invocation}",
            "-o", "cat")
    out = ct.wait_journal("qemu-unit-guest: share ro: write", *args, timeout=BOOT_TIMEOUT)
    report: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("qemu-unit-guest: tpm: ") or line.startswith("qemu-unit-guest: share"):
            what, _, value = line.removeprefix("qemu-unit-guest: ").partition(": ")
            key, _, rest = value.partition(" ")
            report[f"{what} {key}"] = rest
    return report


def virtiofsd_pids(ct: Container) -> list[int]:
    """Every virtiofsd of the VM (each forks once into its PID namespace)."""
    out = ct.run("pgrep", "-f", "virtiofsd .*qemu-run-virtiofsd/dev/", check=False).stdout
    return [int(p) for p in out.split()]


def assert_daemons_run(ct: Container) -> None:
    """Each share's companion unit is active, its main process a running virtiofsd."""
    pids = virtiofsd_pids(ct)
    for unit in COMPANIONS:
        assert prop(ct, unit, "ActiveState") == "active"
        assert int(prop(ct, unit, "MainPID")) in pids


def test_guest_sees_the_tpm_and_reads_and_writes_the_shares(ct: Container) -> None:
    report = start(ct)
    assert "tpm /dev/tpm0" in report, report
    assert report["tpm rc"] == "00000000", report  # TPM_RC_SUCCESS: the EK is there
    SEEN["ek"] = report["tpm ek"]
    assert report["share rw read"] == "hello rw"
    assert report["share rw files"] == str(MANY_FILES + 1)  # and hello
    assert report["share ro files"] == "1"
    assert report["share rw write"] == "ok"
    assert ct.run("cat", str(SHARES / "rw/from-guest")).stdout == "from guest\n"
    # :ro is enforced on the host: the guest reads, its write fails, nothing arrives.
    assert report["share ro read"] == "hello ro"
    assert report["share ro write"] == "failed"
    assert ct.run("test", "-e", str(SHARES / "ro/from-guest"), check=False).returncode == 1

    # The TPM's state is in the VM's state directory (ROOT/lib links there).
    assert ct.run("sh", "-c", f"ls {TPM_STATE}/*/tpm2/tpm2-00.permall").returncode == 0
    # Each share's daemon runs in its own unit, as root, its socket handed to the VM's own
    # user when the VM started (no other VM, nor qemu-run, reaches it).
    assert_daemons_run(ct)
    for tag in ("rw", "ro"):
        sock_dir = ct.run("stat", "-c", "%U:%G %a", f"/run/qemu-run-virtiofsd/dev/{tag}").stdout
        assert sock_dir.split() == ["qemu-vm-dev:qemu-vm-dev", "750"]
        sock = ct.run("stat", "-c", "%U", f"/run/qemu-run-virtiofsd/dev/{tag}/sock").stdout
        assert sock.strip() == "qemu-vm-dev"

    ct.systemctl("stop", UNIT, timeout=120)
    assert prop(ct, UNIT, "Result") == "success"
    for unit in COMPANIONS:
        assert prop(ct, unit, "ActiveState") == "inactive"
    assert virtiofsd_pids(ct) == []


def test_tpm_survives_a_restart_and_a_killed_runner_leaves_no_daemon(ct: Container) -> None:
    assert "ek" in SEEN, "needs the first test"
    report = start(ct)
    assert report["tpm ek"] == SEEN["ek"]
    assert_daemons_run(ct)

    ct.run("kill", "-KILL", prop(ct, UNIT, "MainPID"))
    wait_for("the unit to fail", lambda: prop(ct, UNIT, "ActiveState") == "failed", timeout=60)
    for unit in COMPANIONS:
        wait_for(f"{unit} to stop",
                 lambda unit=unit: prop(ct, unit, "ActiveState") in ("inactive", "failed"))
    assert virtiofsd_pids(ct) == []
    assert qemu_pids(ct, "dev") == []
    ct.systemctl("reset-failed", UNIT, *COMPANIONS, check=False)


def test_reset_makes_a_new_tpm(ct: Container, qemu_unit_bin: Path) -> None:
    assert "ek" in SEEN, "needs the first test"
    out = ct.run(str(qemu_unit_bin), "reset", "dev")
    assert str(TPM_STATE) in out.stdout + out.stderr
    assert ct.run("test", "-e", str(TPM_STATE), check=False).returncode == 1
    report = start(ct)
    assert report["tpm rc"] == "00000000"
    assert report["tpm ek"] != SEEN["ek"]
    ct.systemctl("stop", UNIT, timeout=120)
