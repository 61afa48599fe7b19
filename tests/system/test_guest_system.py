"""`qemu-unit exec` and `qemu-unit cp` into a real Debian 12 guest through its agent, under
qemu-run@NAME.service; a tiny busybox guest without an agent for the refusals.

One Debian VM (`deb`) is booted once for the module (direct kernel boot, no network) and
shared by the tests, in order. Under TCG a boot takes ~30 s idle, minutes when loaded.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.debian import CMDLINE, build_debian_image
from tests.support.vm import (
    console,
    install_qemu_unit,
    prop,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

DATA = Path("/srv/qemu-unit-guest")
BOOT_TIMEOUT = 600
QU: dict[str, str] = {}


def deb_vm() -> str:
    return f"""\
[VM]
Image={DATA}/base.qcow2
Ephemeral=yes
Kernel={DATA}/vmlinuz
Initrd={DATA}/initrd.img
KernelCmdline={CMDLINE}
Accel=tcg
Memory=1G
CPUs=2
Network=none
Ready=healthy
HealthCmd=systemctl is-active ssh
HealthInterval=3s
HealthRetries=2
HealthStartPeriod=10min
ShutdownMode=agent acpi
ShutdownTimeout=120s

[Service]
TimeoutStartSec={BOOT_TIMEOUT}
"""


def prepare(upper: Path) -> None:
    image = build_debian_image()
    data = upper / DATA.relative_to("/")
    data.mkdir(parents=True)
    data.chmod(0o755)
    for src, name in ((image.disk, "base.qcow2"), (image.kernel, "vmlinuz"),
                      (image.initrd, "initrd.img")):
        shutil.copyfile(src, data / name)
        (data / name).chmod(0o644)
    stage_guest(upper)
    write_vm(upper, "deb", deb_vm())
    write_vm(upper, "noagent", vm_text("wait"))
    # An agent channel, but no agent in the guest: every check fails at once.
    # restart: a start period long enough for the guest to boot again after a reset.
    for action, period in (("kill", "0"), ("stop", "0"), ("restart", "5s")):
        write_vm(upper, f"h{action}", vm_text("wait", vm=f"""
HealthCmd=true
HealthInterval=1s
HealthRetries=2
HealthStartPeriod={period}
HealthOnFailure={action}
""", service="RestartSec=1s"))


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("guest", prepare, stop_timeout=60) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        QU["bin"] = str(qemu_unit_bin)
        yield ct


@pytest.fixture(scope="module")
def deb(ct: Container) -> Iterator[str]:
    unit = "qemu-run@deb.service"
    start = time.monotonic()
    ct.systemctl("start", "--no-block", unit)
    wait_for("QEMU", lambda: "health check" in prop(ct, unit, "StatusText"), timeout=120)
    wait_for("ready", lambda: prop(ct, unit, "ActiveState") != "activating",
             timeout=BOOT_TIMEOUT)
    assert prop(ct, unit, "ActiveState") == "active", runner_log(ct, "deb")
    # Ready=healthy: READY=1 came with the first check that passed.
    assert "The first health check passed: ready" in runner_log(ct, "deb")
    print(f"Ready=healthy after {time.monotonic() - start:.1f}s")
    yield "deb"
    ct.systemctl("stop", unit, timeout=180)


def sh(ct: Container, script: str, timeout: float = 300, check: bool = False
       ) -> tuple[int, str, str]:
    """SCRIPT run by a shell in the container, with $QU = the qemu-unit command; its stdin
    is empty (a pipe at its end), never the test's own."""
    proc = ct.run("sh", "-c", script, check=check, timeout=timeout, env={"QU": QU["bin"]},
                  input="")
    return proc.returncode, proc.stdout, proc.stderr


def test_exec_statuses_streams_and_stdin(ct: Container, deb: str) -> None:
    assert sh(ct, '$QU exec deb true') == (0, "", "")
    assert sh(ct, '$QU exec deb -- sh -c "exit 3"')[0] == 3
    # stdout and stderr apart, in the order each was written.
    rc, out, err = sh(ct, '$QU exec deb -- sh -c "echo one; echo two >&2; echo three"')
    assert (rc, out, err) == (0, "one\nthree\n", "two\n")
    # A signal: 128+N, as a shell says it.
    assert sh(ct, '$QU exec deb -- sh -c \'kill -TERM $$\'')[0] == 143
    # Not found / not executable: the guest shell's 127 and 126.
    rc, _out, err = sh(ct, '$QU exec deb /no/such/program')
    assert rc == 127 and "/no/such/program" in err
    assert sh(ct, '$QU exec deb /dev/null')[0] == 126
    # stdin when it is not a terminal; none with -n.
    assert sh(ct, 'printf "a\\nb\\n" | $QU exec deb -- wc -l') == (0, "2\n", "")
    assert sh(ct, 'printf "a\\nb\\n" | $QU exec -n deb -- wc -l') == (0, "0\n", "")
    # 1 MB of stdin: more than one agent request takes (it goes through a file, gone after).
    rc, out, err = sh(ct, 'head -c 1000000 /dev/urandom >/srv/in && '
                          '$QU exec deb sha256sum </srv/in')
    assert (rc, out) == (0, sh(ct, 'sha256sum </srv/in')[1]), err
    assert sh(ct, '$QU exec deb ls -A /tmp | grep -c qemu-unit')[1] == "0\n"
    # --env and --user (runuser in the guest).
    assert sh(ct, '$QU exec -e A=1 -e B="x y" deb -- sh -c \'echo "$A/$B"\'') == (0, "1/x y\n",
                                                                               "")
    assert sh(ct, '$QU exec -u nobody deb -- id -un') == (0, "nobody\n", "")


def test_exec_large_output_is_complete(ct: Container, deb: str) -> None:
    # 50 MB, more than qemu-ga's own 16 MiB capture limit.
    rc, out, err = sh(ct, '$QU exec deb -- head -c 52428800 /dev/urandom | tee /srv/big | '
                          'wc -c; $QU exec deb true')
    assert (rc, out.split(), err) == (0, ["52428800"], "")


def test_exec_timeout_kills_the_command(ct: Container, deb: str) -> None:
    start = time.monotonic()
    rc, out, err = sh(ct, '$QU exec --timeout 3 deb -- sh -c "echo started; sleep 600"')
    assert rc == 124 and out == "started\n"
    assert "ran longer than 3s: killed" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - start < 60
    # Nothing is left running in the guest ("6[0]0": not this command's own line).
    out = sh(ct, '$QU exec deb -- sh -c \'cat /proc/[0-9]*/cmdline | tr "\\0" " " | '
                 'grep -c "sleep 6[0]0"\'')[1]
    assert out == "0\n"


def test_exec_refusals_are_one_line(ct: Container, deb: str) -> None:
    rc, _out, err = sh(ct, '$QU exec nosuch true')
    assert rc == 69 and err.count("\n") == 1 and "nosuch is not running" in err
    ct.systemctl("start", "qemu-run@noagent.service")
    try:
        start = time.monotonic()
        rc, _out, err = sh(ct, '$QU exec noagent true')
        assert rc == 78, err
        assert err.count("\n") == 1 and "no guest agent channel" in err
        assert time.monotonic() - start < 30
    finally:
        ct.systemctl("stop", "qemu-run@noagent.service")


def test_cp_100_mb_both_ways(ct: Container, deb: str) -> None:
    # 100 MB of random bytes there and back: the same checksum, the mode kept, no
    # temporary name left on either side.
    assert sh(ct, 'head -c 100000000 /dev/urandom >/srv/blob && chmod 0640 /srv/blob')[0] == 0
    start = time.monotonic()
    rc, _out, err = sh(ct, '$QU cp /srv/blob deb:/root/blob', timeout=1800)
    assert rc == 0, err
    pushed = time.monotonic() - start
    rc, out, err = sh(ct, '$QU exec deb -- sh -c "sha256sum </root/blob; stat -c %a /root/blob; '
                          'ls -A /root | grep -c qemu-unit"')
    local = sh(ct, 'sha256sum </srv/blob')[1]
    assert out == f"{local}640\n0\n", err
    start = time.monotonic()
    rc, _out, err = sh(ct, '$QU cp deb:/root/blob /srv/blob.back', timeout=1800)
    assert rc == 0, err
    pulled = time.monotonic() - start
    assert sh(ct, 'sha256sum </srv/blob.back; stat -c %a /srv/blob.back; ls -A /srv | '
                  'grep -c "^\\.blob"')[1] == f"{local}640\n0\n"
    print(f"100 MB cp: push {pushed:.1f}s, pull {pulled:.1f}s")
    sh(ct, 'rm -f /srv/blob /srv/blob.back; $QU exec deb rm -f /root/blob')


def test_cp_directories_and_missing_paths(ct: Container, deb: str) -> None:
    assert sh(ct, 'mkdir -p /srv/tree/sub && echo a >/srv/tree/a && echo b >/srv/tree/sub/b '
                  '&& chmod 0700 /srv/tree/sub')[0] == 0
    rc, _out, err = sh(ct, '$QU cp -r /srv/tree deb:/root/t1')
    assert rc == 0, err
    rc, out, err = sh(ct, '$QU exec deb -- sh -c "cat /root/t1/a /root/t1/sub/b; '
                          'stat -c %a /root/t1/sub"')
    assert out == "a\nb\n700\n", err
    rc, _out, err = sh(ct, '$QU cp -r deb:/root/t1 /srv/t2 && cat /srv/t2/a /srv/t2/sub/b && '
                           'stat -c %a /srv/t2/sub')
    assert (rc, _out) == (0, "a\nb\n700\n"), err
    # Without -r: refused; missing on either side: exit 1, one line, nothing made.
    assert sh(ct, '$QU cp /srv/tree deb:/root/t3')[0] == 64
    rc, _out, err = sh(ct, '$QU cp deb:/no/such /srv/x')
    assert rc == 1 and "no such file" in err and err.count("\n") == 1
    assert not sh(ct, 'ls -A /srv | grep -e "^x" -e "^\\.x"')[1]
    rc, _out, err = sh(ct, '$QU cp /srv/no-such deb:/root/')
    assert rc == 1 and err.count("\n") == 1
    rc, _out, err = sh(ct, '$QU cp /srv/tree/a deb:/no/such/dir/a')
    assert rc != 0 and err.count("\n") == 1
    assert sh(ct, '$QU exec deb -- ls -A /no/such/dir')[0] != 0


def _health(ct: Container, vm: str) -> dict[str, object]:
    out = ct.run(QU["bin"], "status", "--json", "-n", "0", vm).stdout
    value = json.loads(out)["vm"]["health"]
    assert isinstance(value, dict)
    return value


def test_health_turns_unhealthy_when_the_guest_stops_a_service(ct: Container, deb: str) -> None:
    assert _health(ct, deb)["status"] == "healthy"
    unit = "qemu-run@deb.service"
    assert sh(ct, '$QU exec deb -- systemctl stop ssh.service ssh.socket')[0] == 0
    h = wait_for("unhealthy", lambda: (x := _health(ct, deb))["status"] == "unhealthy" and x,
                 timeout=120)
    assert h["failing_streak"] >= 2 and h["last_output"] in ("inactive", "failed")
    assert "unhealthy" in prop(ct, unit, "StatusText")
    entries = [json.loads(line) for line in ct.journal(
        "-u", unit, "QEMU_UNIT_HEALTH=unhealthy", "-o", "json").splitlines()]
    assert entries and entries[-1]["QEMU_UNIT_HEALTH_STREAK"] == "2"
    assert "healthy -> unhealthy" in entries[-1]["MESSAGE"]
    # HealthOnFailure=none: it only says so.
    assert prop(ct, unit, "ActiveState") == "active"
    assert sh(ct, '$QU exec deb -- systemctl start ssh.service')[0] == 0
    wait_for("healthy", lambda: _health(ct, deb)["status"] == "healthy", timeout=120)


@pytest.mark.parametrize("action", ["kill", "stop", "restart"])
def test_health_on_failure(ct: Container, action: str) -> None:
    vm, unit = f"h{action}", f"qemu-run@h{action}.service"
    ct.systemctl("start", unit)
    try:
        log = wait_for("unhealthy", lambda: "-> unhealthy" in (x := runner_log(ct, vm)) and x,
                       timeout=120)
        assert "guest agent is not connected" in log
        if action == "kill":
            wait_for("restart", lambda: int(prop(ct, unit, "NRestarts")) >= 1, timeout=60)
            assert "Unhealthy with HealthOnFailure=kill: destroying the VM" in log
        elif action == "stop":
            wait_for("stopped", lambda: prop(ct, unit, "ActiveState") == "inactive", timeout=60)
            assert prop(ct, unit, "Result") == "success"
            assert "The VM is unhealthy (HealthOnFailure=stop): shutting the guest down" in \
                runner_log(ct, vm)
        else:
            # The guest boots again in place; the unit stays up.
            wait_for("reboot", lambda: console(ct, vm).count("qemu-unit-guest: booted") >= 2,
                     timeout=120)
            assert prop(ct, unit, "ActiveState") == "active"
            assert prop(ct, unit, "NRestarts") == "0"
    finally:
        ct.systemctl("stop", unit)

