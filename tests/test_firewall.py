"""The guest firewall's pieces (vm/firewall.py) and what the generator tells it.

The rule itself against a real guest: tests/system/test_guestnet_system.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qemu_unit import paths
from qemu_unit.config import settings
from qemu_unit.config.unitfile import UnitFile, parse
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.generator import convert
from qemu_unit.vm import firewall
from qemu_unit.vm.firewall import Cgroup, HostAccess
from tests.support.requirements import require_tools, unavailable

UNIT_CGROUP = "0::/machine.slice/qemu-run@web.service\n"


def vm_of(text: str, name: str = "web") -> settings.VMConfig:
    path = f"/etc/qemu-run/{name}.vm"
    return settings.parse_vm(name, UnitFile(path, tuple(parse(text, path))))


def service(text: str, *, user: bool = False) -> list[tuple[str, str]]:
    generated = convert.convert(vm_of(text), user=user)
    return [(e.key, e.value) for e in parse(generated.files[0][1], "x")
            if e.section == "Service"]


def test_table_names() -> None:
    assert firewall.table_name("web") == "qemu-run-web"
    assert firewall.table_name("db-1.example_a") == "qemu-run-db-1.example_a"
    # '@' and ':' are no part of an nft name: replaced, and a hash keeps names apart.
    a, b = firewall.table_name("a@b"), firewall.table_name("a:b")
    assert a.startswith("qemu-run-a_b-") and b.startswith("qemu-run-a_b-") and a != b


def _cgroup_root(tmp_path: Path, hybrid: bool) -> Path:
    root = tmp_path / "cgroup"
    v2 = root / "unified" if hybrid else root
    (v2 / "machine.slice/qemu-run@web.service").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("")
    return root


@pytest.mark.parametrize("hybrid", [False, True], ids=["unified", "hybrid"])
def test_own_cgroup(tmp_path: Path, hybrid: bool) -> None:
    root = _cgroup_root(tmp_path, hybrid)
    v1_lines = "12:memory:/machine.slice/qemu-run@web.service\n"
    cgroup = firewall.own_cgroup(v1_lines + UNIT_CGROUP, root)
    prefix = "unified/" if hybrid else ""
    assert cgroup == Cgroup("/machine.slice/qemu-run@web.service",
                            f"{prefix}machine.slice/qemu-run@web.service", 2)
    assert cgroup.selector == (
        f'socket cgroupv2 level 2 "{prefix}machine.slice/qemu-run@web.service"')


def test_own_cgroup_refusals(tmp_path: Path) -> None:
    root = _cgroup_root(tmp_path, hybrid=False)
    with pytest.raises(QemuUnitError, match="no cgroup v2"):
        firewall.own_cgroup("1:name=systemd:/x\n", root)
    with pytest.raises(QemuUnitError, match="cannot be matched"):
        firewall.own_cgroup('0::/machine.slice/a"b\n', root)
    with pytest.raises(QemuUnitError, match="cannot be matched"):
        firewall.own_cgroup("0::/\n", root)
    with pytest.raises(QemuUnitError, match="no such cgroup"):
        firewall.own_cgroup("0::/machine.slice/gone.service\n", root)
    with pytest.raises(QemuUnitError, match="no cgroup v2 hierarchy"):
        firewall.own_cgroup(UNIT_CGROUP, tmp_path / "empty")


def test_local_nameservers() -> None:
    text = ("# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.1\nnameserver ::1\n"
            "nameserver fe80::1%eth0\nnameserver bogus\nnameserver 127.0.0.53\noptions x\n")
    assert firewall.local_nameservers(text) == ("127.0.0.53", "::1")


CGROUP = Cgroup("/machine.slice/qemu-run@web.service", "machine.slice/qemu-run@web.service", 2)
MATCH = 'socket cgroupv2 level 2 "machine.slice/qemu-run@web.service" ct state new'


def _rules(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip().startswith("socket")]


def test_ruleset_refuses_every_local_address() -> None:
    script = firewall.ruleset("qemu-run-web", CGROUP, HostAccess.NONE)
    # Replaced in one transaction: created empty if missing, deleted, made afresh.
    assert script.startswith("table inet qemu-run-web\ndelete table inet qemu-run-web\n")
    assert "type filter hook output priority filter; policy accept;" in script
    assert _rules(script) == [f"{MATCH} fib daddr type local reject"]


def test_ruleset_with_loopback_and_a_local_resolver() -> None:
    script = firewall.ruleset("qemu-run-web", CGROUP, HostAccess.LOOPBACK,
                              ("127.0.0.53", "::1"))
    assert _rules(script) == [
        f"{MATCH} ip daddr 127.0.0.53 meta l4proto {{ tcp, udp }} th dport 53 accept",
        f"{MATCH} ip6 daddr ::1 meta l4proto {{ tcp, udp }} th dport 53 accept",
        f"{MATCH} ip daddr 127.0.0.0/8 accept",
        f"{MATCH} ip6 daddr ::1 accept",
        f"{MATCH} fib daddr type local reject",
    ]


@pytest.mark.parametrize("access", list(HostAccess))
def test_ruleset_parses(access: HostAccess) -> None:
    """nft reads the script (--check: nothing is loaded). nft resolves the cgroup path, so
    the rule names one that exists: any cgroup under the v2 root."""
    require_tools("nft", fix="run ./setup.sh (it installs nftables)")
    root = firewall.CGROUP_ROOT
    prefix = "" if (root / "cgroup.controllers").exists() else f"{firewall.HYBRID_SUBDIR}/"
    children = sorted(p for p in (root / prefix).iterdir() if p.is_dir())
    if not children:
        unavailable("no cgroup v2 hierarchy with a child cgroup here", "run on a systemd host")
    cgroup = Cgroup(f"/{children[0].name}", f"{prefix}{children[0].name}", 1)
    script = firewall.ruleset("qemu-run-check", cgroup, access, ("127.0.0.53",))
    proc = subprocess.run(["nft", "--check", "-f", "-"], input=script, text=True,
                          capture_output=True, check=False)
    assert proc.returncode == 0 or "Operation not permitted" in proc.stderr, proc.stderr


def test_host_access_values() -> None:
    assert HostAccess.parse("none") is HostAccess.NONE
    assert HostAccess.parse("loopback") is HostAccess.LOOPBACK
    with pytest.raises(QemuUnitError, match=r"\$QEMU_UNIT_HOST_ACCESS='all': expected"):
        HostAccess.parse("all")


def test_check_targets() -> None:
    assert firewall.check_targets(HostAccess.NONE) == ["127.0.0.1"]
    # Never a loopback address when loopback is allowed (there may be none at all).
    assert not any(a.startswith("127.") for a in firewall.check_targets(HostAccess.LOOPBACK))


def test_refused_sees_an_open_listener() -> None:
    # No rule here: the listener answers, so the check must say "not refused".
    assert firewall.refused("127.0.0.1") is False


# What the generator tells the template's guest-firewall steps


def test_generator_sets_the_mode_for_user_networks() -> None:
    env = (convert.HOST_ACCESS_ENV, paths.HOST_ACCESS_ENV)
    assert env[0] == env[1] == "QEMU_UNIT_HOST_ACCESS"
    assert ("Environment", "QEMU_UNIT_HOST_ACCESS=none") in service("[VM]\n")
    assert ("Environment", "QEMU_UNIT_HOST_ACCESS=loopback") in service(
        "[VM]\nAllowHostLoopback=yes\nPublishPort=127.0.0.1:8080:80\n")
    # Ports on every address: still the user network, still the firewall.
    assert ("Environment", "QEMU_UNIT_HOST_ACCESS=none") in service(
        "[VM]\nPublishPort=8080:80\n")


@pytest.mark.parametrize("text", [
    "[VM]\nNetwork=none\nAllowHostLoopback=yes\n",
    "[VM]\nRestrictNetwork=yes\n",
    "[VM]\nRestrictNetwork=yes\nPublishPort=127.0.0.1:2222:22\n",
    "[VM]\nRestrictNetwork=yes\nPublishPort=2222:22\nAllowHostLoopback=yes\n",
    "[VM]\nNetwork=tap:vm0\n",
])
def test_no_firewall_where_the_guest_reaches_no_host_socket(text: str) -> None:
    # restrict=on: QEMU itself keeps the guest from every address; tap: the guest's
    # packets are the host firewall's, not sockets of the unit.
    assert not [v for k, v in service(text) if k == "Environment"]


def test_no_firewall_for_a_users_vm() -> None:
    # A user's manager runs no root step (README: what rootless VMs reach).
    assert not [v for k, v in service("[VM]\n", user=True) if k == "Environment"]


def test_only_vms_with_the_mode_set_have_the_firewall_steps() -> None:
    """The generator writes the root steps into the drop-ins of the VMs that need them; the
    template has none (a step there would cost every VM's start and stop a process)."""
    from qemu_unit.config import settings, unitfile
    from qemu_unit.generator import convert

    template = (Path(__file__).parents[1] / "units" / paths.TEMPLATE_UNIT).read_text()
    assert not [line for line in template.splitlines()
                if line.startswith("Exec") and "guest-firewall" in line]

    def steps(text: str) -> list[tuple[str, str]]:
        entries = tuple(unitfile.parse(text, "/etc/qemu-run/web.vm"))
        vm = settings.parse_vm("web", unitfile.UnitFile("/etc/qemu-run/web.vm", entries))
        return [(k, v) for k, v in convert.implied_service(vm, convert.host_needs(vm))
                if k.startswith("Exec") or k == "Environment"]

    python = f"{sys.executable} -I -m qemu_unit"
    assert steps("[VM]\nNetwork=user\n") == [
        ("Environment", f"{paths.HOST_ACCESS_ENV}=none"),
        ("ExecStartPre", f"+{python} guest-firewall start %i"),
        ("ExecStopPost", f"-+{python} guest-firewall stop %i"),
    ]
    assert steps("[VM]\nNetwork=none\n") == []
    # restrict=on: the guest reaches nothing of the host, no firewall to load.
    assert steps("[VM]\nNetwork=user\nRestrictNetwork=yes\n") == []


def _runtime(tmp_path: Path) -> Path:
    (tmp_path / "web").mkdir(mode=0o700)
    return tmp_path


def test_a_failed_load_is_the_runners_exit_78(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A failing ExecStartPre= would be restarted until the start limit; the runner's 78 is not.
    roots = _runtime(tmp_path)

    def fail(name: str, access: HostAccess) -> None:
        raise QemuUnitError(f"guest firewall for {name}: nft said no")

    monkeypatch.setattr(firewall, "_load", fail)
    assert firewall.start("web", HostAccess.NONE, roots) == 0
    note = roots / "web" / firewall.NOTE
    assert oct(note.stat().st_mode & 0o777) == "0o644"  # the runner is another uid
    with pytest.raises(ConfigError, match="nft said no") as caught:
        firewall.require(roots / "web")
    assert caught.value.exit_status == 78
    # Without a runtime directory (a start by hand) the failure is the command's own.
    with pytest.raises(QemuUnitError, match="nft said no"):
        firewall.start("other", HostAccess.NONE, roots)


def test_the_runner_needs_the_loaded_note(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    roots = _runtime(tmp_path)
    with pytest.raises(ConfigError, match="left no note"):
        firewall.require(roots / "web")
    monkeypatch.setattr(firewall, "_load", lambda name, access: None)
    assert firewall.start("web", HostAccess.LOOPBACK, roots) == 0
    firewall.require(roots / "web")
    # A link planted in its place is not followed.
    note = roots / "web" / firewall.NOTE
    note.unlink()
    (tmp_path / "elsewhere").write_text(firewall.LOADED)
    note.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="left no note"):
        firewall.require(roots / "web")
