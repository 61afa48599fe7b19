"""Rootless VMs under a user's own systemd manager, in a real systemd (container).

A user with lingering (`loginctl enable-linger`) writes ~/.config/qemu-run/tiny.vm and,
through its own user manager, starts, lists, attaches to and stops the VM; enabled by
[Install] (WantedBy=multi-user.target, which a user manager reads as default.target) it
runs again after the container reboots; a second user sees none of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.terminal import Attached
from tests.support.vm import install_qemu_unit, stage_guest, vm_text, wait_for

UNIT = "qemu-run@tiny.service"


def prepare(upper: Path) -> None:
    stage_guest(upper)


class User:
    """Commands as NAME inside the container, with the environment of its session."""

    def __init__(self, ct: Container, name: str) -> None:
        self.ct = ct
        self.name = name
        ct.run("useradd", "--create-home", "--shell", "/bin/sh", name)
        self.uid = int(ct.run("id", "-u", name).stdout)
        self.prefix = ("runuser", "-u", name, "--", "env", f"HOME=/home/{name}",
                       f"XDG_RUNTIME_DIR=/run/user/{self.uid}", f"USER={name}")

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 120) -> str:
        return self.ct.run(*self.prefix, *cmd, check=check, input=input, timeout=timeout).stdout

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run("systemctl", "--user", "--no-pager", *args, check=check, timeout=180)

    def state(self, unit: str = UNIT) -> str:
        return self.systemctl("show", "-P", "ActiveState", unit).strip()

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--user", "--no-pager", *args, check=False)


def linger(ct: Container, user: User) -> None:
    """Lingering starts the user's manager now and at every boot, without a login."""
    ct.run("loginctl", "enable-linger", user.name)
    wait_for(f"user@{user.uid}.service", lambda: ct.run(
        "systemctl", "is-active", f"user@{user.uid}.service", check=False).stdout.strip()
        == "active", timeout=60)


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("rootless", prepare) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        yield ct


def test_a_user_runs_its_own_vm_and_a_second_user_sees_none_of_it(
    ct: Container, qemu_unit_bin: Path
) -> None:
    qu = str(qemu_unit_bin)
    alice, bob = User(ct, "alice"), User(ct, "bob")
    linger(ct, alice)
    # Accel= unset (auto): the container has no /dev/kvm, so TCG with one warning line.
    text = vm_text("shell", install="WantedBy=multi-user.target").replace("Accel=tcg\n", "")
    alice.run("sh", "-c", "mkdir -p ~/.config/qemu-run && cat > ~/.config/qemu-run/tiny.vm",
              input=text)
    # A tap network needs root: refused with one line naming file, line and reason.
    alice.run("sh", "-c", "cat > ~/.config/qemu-run/tapped.vm",
              input="[VM]\nNetwork=tap:tap0\nCDROM=/srv/qemu-unit-test/vmlinuz\n")
    alice.systemctl("daemon-reload")
    # [Install] WantedBy=multi-user.target: the user manager's default.target wants it.
    assert "default.target" in alice.systemctl("show", "-P", "WantedBy", UNIT).split()

    started = time.monotonic()
    alice.systemctl("start", UNIT)  # Type=notify: returns once the domain runs
    start_seconds = time.monotonic() - started
    try:
        assert alice.state() == "active"
        listed = json.loads(alice.run(qu, "--user", "list", "--json"))["vms"]
        by_name = {vm["name"]: vm for vm in listed}
        assert by_name["tiny"]["active_state"] == "active"
        assert by_name["tiny"]["source"] == "/home/alice/.config/qemu-run/tiny.vm"
        assert by_name["tiny"]["accelerator"] == "tcg"
        # Its state and caches are the user's, its embed root under the user's runtime dir.
        assert ct.run("stat", "-c", "%U", f"/run/user/{alice.uid}/qemu-run/tiny").stdout.strip() \
            == "alice"
        assert ct.run("test", "-d", "/home/alice/.cache/qemu-run/qemu", check=False).returncode \
            == 0
        assert not ct.run("ls", "/run/qemu-run", check=False).stdout.strip()
        # journalctl --user -u: the guest's console and the runner's own lines.
        wait_for("the guest's shell", lambda: "qemu-unit-guest: shell ready" in alice.journal(
            "-u", UNIT, "-o", "cat"), timeout=120)
        runner = alice.journal("-u", UNIT, "-t", "qemu-unit", "-o", "cat")
        assert runner.count("KVM is unusable") == 1, runner
        status = json.loads(alice.run(qu, "--user", "status", "tiny", "--json", "-n", "50"))
        assert "qemu-unit-guest: shell ready" in status["console"]
        # State and console.log in the user's XDG state directory.
        assert "shell ready" in ct.run(
            "cat", "/home/alice/.local/state/qemu-run/tiny/console.log").stdout
        # The console, through the user's own runner.
        term = Attached(ct, qemu_unit_bin, "tiny", prefix=alice.prefix, options=("--user",))
        try:
            term.expect("Connected to the console of tiny; detach with Ctrl-]")
            term.type(b"echo rootless-$((6*7))\r")
            term.expect("rootless-42")
            assert term.detach() == 0
        finally:
            term.close()
        # The VM that needs root: skipped by the user generator, refused by validate and
        # run, each time with one line naming file, line and reason.
        refusal = "tapped.vm:2: Network=: not in a user's VM: tap:tap0 needs root"
        assert alice.systemctl("show", "-P", "DropInPaths", "qemu-run@tapped.service") \
            .strip() == ""
        wait_for("the user generator's message", lambda: refusal in ct.journal(
            "-u", f"user@{alice.uid}.service", "-o", "cat"))
        for verb in ("validate", "run"):
            refused = ct.run(*alice.prefix, qu, "--user", verb, "tapped", check=False)
            assert refused.returncode == 78
            assert refusal in refused.stderr and len(refused.stderr.splitlines()) == 1, \
                refused.stderr

        # Bob: none of alice's VMs, in qemu-unit or in his manager; her console is closed.
        linger(ct, bob)  # his manager and his private runtime directory
        assert json.loads(bob.run(qu, "--user", "list", "--json"))["vms"] == []
        assert bob.state() == "inactive"
        assert bob.systemctl("list-units", "--all", "--plain", "--no-legend",
                             "qemu-run@*").strip() == ""
        denied = ct.run(*bob.prefix, qu, "--user", "console", "tiny", check=False, input="")
        assert denied.returncode == 1 and "not running" in denied.stderr, denied.stderr
        assert ct.run(*bob.prefix, "ls", f"/run/user/{alice.uid}/qemu-run",
                      check=False).returncode != 0
    except BaseException:
        print(alice.journal("-n", "80", "-o", "short-monotonic"))
        raise

    # Enabled and lingering: after a reboot the VM runs again, with nobody logged in.
    rebooted = time.monotonic()
    ct.reboot()
    wait_for("tiny after the reboot", lambda: alice.state() == "active", timeout=180)
    print(f"\nrootless: systemctl --user start (cold capability cache) {start_seconds:.2f} s; "
          f"reboot to active again {time.monotonic() - rebooted:.2f} s")
    alice.systemctl("stop", UNIT)
    assert alice.state() == "inactive"
    assert "qemu-unit-guest: power button pressed" in alice.journal("-b", "-u", UNIT, "-o", "cat")
    assert ct.run("pgrep", "-f", "qemu-system", check=False).stdout.strip() == ""
