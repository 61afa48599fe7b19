"""What a guest on the user network reaches of the host (issue 15): a server on the host's
loopback is refused to a real guest while the guest's published port answers;
AllowHostLoopback=yes opens the loopback; a VM whose guest firewall cannot be loaded does
not start.

The container has a network namespace of its own (--private-network): nspawn leaves a
container that shares the host's no CAP_NET_ADMIN, and its guests reach nothing beyond
the container's loopback either way.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu_unit.vm import firewall
from tests.support.container import Container
from tests.support.vm import (
    console,
    install_qemu_unit,
    invocation,
    prop,
    put_file,
    qemu_pids,
    stage_guest,
    vm_text,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

HOST_PORT = 18080  # the host's loopback-only server
GUEST_PORT = 8080  # the guest's page, published on 127.0.0.1:PUBLISHED[vm]
PUBLISHED = {"closed": 18081, "open": 18082, "nonft": 18083}
HOST_PAGE = "host-secret"


def _vm(name: str, extra: str = "") -> str:
    url = f"http://10.0.2.2:{HOST_PORT}/"
    return vm_text("net", vm=f"Network=\nNetwork=user\n"
                             f"PublishPort=127.0.0.1:{PUBLISHED[name]}:{GUEST_PORT}\n{extra}",
                   cmdline_extra=f"qemu_unit.url={url} qemu_unit.serve={GUEST_PORT}")


def prepare(upper: Path) -> None:
    stage_guest(upper)
    write_vm(upper, "closed", _vm("closed"))
    write_vm(upper, "open", _vm("open", "AllowHostLoopback=yes"))
    write_vm(upper, "nonft", _vm("nonft"))


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path) -> Iterator[Container]:
    with Container("guestnet", prepare, nspawn_args=("--private-network",)) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        put_file(ct, "/srv/www/index.html", f"{HOST_PAGE}\n")
        ct.run("systemd-run", "--unit=host-loopback-server", "--", "/usr/bin/python3", "-m",
               "http.server", "--bind", "127.0.0.1", "--directory", "/srv/www",
               str(HOST_PORT))
        wait_for("the host's server", lambda: _get(ct, HOST_PORT) == HOST_PAGE)
        yield ct


def _get(ct: Container, port: int) -> str:
    """The page on 127.0.0.1:PORT as a process of the host (outside any VM's unit) gets it."""
    url = urllib.parse.quote(f"http://127.0.0.1:{port}/", safe=":/")
    script = (f"import urllib.request as u\ntry: print(u.urlopen('{url}', timeout=5)"
              ".read().decode().strip())\nexcept OSError as e: print('error', e)")
    return ct.run("python3", "-c", script, check=False).stdout.strip()


def _fetch_result(ct: Container, vm: str, of: str) -> str:
    def line() -> str | None:
        for text in console(ct, vm, of).splitlines():
            if "qemu-unit-guest: fetch" in text:
                return text
        return None
    return wait_for(f"{vm}'s fetch", line, timeout=90)


def _table(ct: Container, vm: str) -> str:
    return ct.run("nft", "list", "table", "inet", firewall.table_name(vm), check=False).stdout


def test_guest_cannot_reach_host_loopback_but_its_published_port_answers(ct: Container) -> None:
    unit = "qemu-run@closed.service"
    ct.systemctl("start", unit)
    of = invocation(ct, "closed")
    assert "QEMU_UNIT_HOST_ACCESS=none" in prop(ct, unit, "Environment").split()
    assert prop(ct, unit, "PrivateNetwork") == "no"
    result = _fetch_result(ct, "closed", of)
    assert result == f"qemu-unit-guest: fetch failed http://10.0.2.2:{HOST_PORT}/", result
    # The same page, from the host itself: there, and answering.
    assert _get(ct, HOST_PORT) == HOST_PAGE
    # Connections made to the guest come in through the published port.
    wait_for("serving", lambda: f"serving on {GUEST_PORT}" in console(ct, "closed", of))
    assert wait_for("published port", lambda: _get(ct, PUBLISHED["closed"]) == "guest-page"
                    and "guest-page")
    table = _table(ct, "closed")
    assert "fib daddr type local reject" in table and "127.0.0.0/8" not in table, table
    said = ct.journal(f"_SYSTEMD_INVOCATION_ID={of}", "-o", "cat")
    assert "Guest firewall: table inet qemu-run-closed" in said, said
    ct.systemctl("stop", unit)
    assert prop(ct, unit, "Result") == "success"
    assert _table(ct, "closed") == ""


def test_allow_host_loopback_opens_it(ct: Container) -> None:
    unit = "qemu-run@open.service"
    ct.systemctl("start", unit)
    of = invocation(ct, "open")
    assert _fetch_result(ct, "open", of) == f"qemu-unit-guest: fetched {HOST_PAGE}"
    assert wait_for("published port", lambda: _get(ct, PUBLISHED["open"]) == "guest-page"
                    and "guest-page")
    # The host's other addresses stay closed (this container has none but loopback).
    table = _table(ct, "open")
    assert "ip daddr 127.0.0.0/8 accept" in table and "fib daddr type local reject" in table
    ct.systemctl("stop", unit)
    assert _table(ct, "open") == ""


def test_vm_without_a_working_firewall_does_not_start(ct: Container) -> None:
    unit = "qemu-run@nonft.service"
    ct.run("mv", "/usr/sbin/nft", "/usr/sbin/nft.hidden")
    try:
        start = ct.systemctl("start", unit, check=False)
    finally:
        ct.run("mv", "/usr/sbin/nft.hidden", "/usr/sbin/nft")
    try:
        assert start.returncode != 0
        # Failed for good: the runner's exit 78, no restart loop; never running.
        assert prop(ct, unit, "SubState") == "failed"
        assert prop(ct, unit, "ExecMainStatus") == "78"
        assert prop(ct, unit, "NRestarts") == "0"
        assert qemu_pids(ct, "nonft") == []
        said = ct.journal("-u", unit, "-o", "cat")
        assert ("guest firewall for nonft: loading the guest firewall: nft is not installed"
                in said), said
        assert "not starting the VM" in said
    finally:
        ct.systemctl("stop", unit, check=False)
        ct.systemctl("reset-failed", unit, check=False)
