"""render.py: what the runner changes in a domain before starting it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qemu_unit.errors import EX_CONFIG, ConfigError
from qemu_unit.render import adapt_xml

VIRSH_XML = """<domain type='qemu'>
  <name>old</name>
  <memory>262144</memory>
  <os><type>hvm</type></os>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <console type='pty'><target type='virtio' port='1'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/long/path/ga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"""


def adapt(xml: str, **kw: object) -> ET.Element:
    args: dict[str, object] = {
        "name": "web",
        "path": "/etc/qemu-run/web.xml",
        "console": Path("/run/qemu-run/web/console.sock"),
        "agent": Path("/run/qemu-run/web/agent.sock"),
        "kvm": None,
    }
    args.update(kw)
    out, _virt = adapt_xml(xml, **args)  # type: ignore[arg-type]
    return ET.fromstring(out)


def test_name_console_and_agent_are_taken_over() -> None:
    root = adapt(VIRSH_XML)
    assert root.findtext("name") == "web"
    [serial] = root.findall("devices/serial")
    assert serial.get("type") == "unix"
    assert serial.find("source").attrib == {  # type: ignore[union-attr]
        "mode": "connect",
        "path": "/run/qemu-run/web/console.sock",
    }
    assert serial.find("target").get("port") == "0"  # type: ignore[union-attr]
    # The serial console goes (libvirt mirrors serial 0 again); the virtio one stays.
    consoles = root.findall("devices/console")
    assert [c.find("target").get("type") for c in consoles] == ["virtio"]  # type: ignore[union-attr]
    [chan] = root.findall("devices/channel")
    assert chan.find("source").get("path") == "/run/qemu-run/web/agent.sock"  # type: ignore[union-attr]


def test_a_domain_without_serial_gets_one() -> None:
    root = adapt("<domain type='qemu'><name>x</name></domain>")
    [serial] = root.findall("devices/serial")
    assert serial.get("type") == "unix"


def test_console_none_leaves_serial_alone() -> None:
    root = adapt(VIRSH_XML, console=None)
    assert root.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("xml", "kw", "message"),
    [
        ("<domain><name>", {}, "malformed domain XML"),
        ("<network/>", {}, "expected <domain>"),
        ("<domain type='kvm'/>", {"kvm": "/dev/kvm: Permission denied"}, "KVM is unusable"),
        (
            "<domain><os><kernel>/nonexistent/vmlinuz</kernel></os></domain>",
            {},
            "/nonexistent/vmlinuz, which is missing",
        ),
        (
            "<domain><devices><disk><source file='/nonexistent.img'/></disk></devices></domain>",
            {},
            "/nonexistent.img",
        ),
    ],
)
def test_bad_domains_are_config_errors(xml: str, kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        adapt(xml, **kw)
    assert message in str(err.value)
    assert str(err.value).startswith("/etc/qemu-run/web.xml")
    assert err.value.exit_status == EX_CONFIG


def test_render_and_validate_honour_accel_of_a_domain_xml_vm(tmp_path: Path) -> None:
    from qemu_unit import render

    (tmp_path / "full.xml").write_text(
        "<domain type='qemu'><name>x</name><memory>262144</memory>"
        "<os><type>hvm</type><kernel>/nonexistent/vmlinuz</kernel></os></domain>"
    )
    (tmp_path / "x.vm").write_text(f"[VM]\nDomainXML={tmp_path}/full.xml\nAccel=tcg\n")
    assert "<domain type='qemu'>" in render.render_name("x", [tmp_path])
    [problem] = render.validate(["x"], [tmp_path])
    assert problem == f"{tmp_path}/full.xml: <kernel> names /nonexistent/vmlinuz, which is missing"
    [problem] = render.validate([str(tmp_path / "x.vm")])  # by path, same answer
    assert "/nonexistent/vmlinuz" in problem
