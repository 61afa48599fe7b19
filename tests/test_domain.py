"""domain.py: VMConfig -> libvirt domain XML, checked by libvirt's embed driver itself."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemu_unit.config.settings import Accel, Disk, VMConfig, parse_vm
from qemu_unit.config.unitfile import UnitFile, parse
from qemu_unit.errors import ConfigError
from qemu_unit.vm import domain
from tests.test_fixtures import fixtures, load_fixture, plan_of

# Defines each domain through qemu:///embed and prints what libvirt made of it.
DEFINE = r"""
import json, sys, threading
import libvirt

libvirt.virEventRegisterDefaultImpl()

def loop():
    while True:
        libvirt.virEventRunDefaultImpl()

threading.Thread(target=loop, daemon=True).start()
libvirt.registerErrorHandler(lambda *args: None, None)
conn = libvirt.open("qemu:///embed?root=" + sys.argv[1])
out = {}
for label, xml in json.load(sys.stdin).items():
    try:
        dom = conn.defineXML(xml)
        out[label] = {"error": None, "xml": dom.XMLDesc(0)}
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
    except libvirt.libvirtError as e:
        out[label] = {"error": str(e), "xml": None}
conn.close()
json.dump(out, sys.stdout)
"""
NOBODY = 65534


def vm_of(text: str, name: str = "web") -> VMConfig:
    return parse_vm(name, UnitFile("/x.vm", tuple(parse(text, "/x.vm"))))


def root_of(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def tcg_domains() -> tuple[dict[str, str], list[str]]:
    """Every fixture that renders, rendered for TCG; and the names that need KVM."""
    out, kvm_only = {}, []
    for f in fixtures():
        if f.expects_load_error or f.get("assert-render-error"):
            continue
        vm = load_fixture(f)
        if vm.accel is Accel.KVM:
            kvm_only.append(f.name)
            continue
        out[f.name] = domain.render(vm, plan_of(vm))
    return out, kvm_only


def define_all(domains: dict[str, str]) -> dict[str, Any]:
    """Define DOMAINS in one fresh embed root (one connection: the capability probe is slow)."""
    # Short: libvirt's sockets live below the root. Unprivileged, because as
    # root the embed driver wants the libvirt-qemu user (FACTS.md).
    root = Path(tempfile.mkdtemp(prefix="qu", dir="/var/tmp"))
    try:
        (root / "etc").mkdir()
        (root / "home").mkdir()
        (root / "etc" / "qemu.conf").write_text('stdio_handler = "file"\n')
        home = str(root / "home")
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home,
            "XDG_CACHE_HOME": home + "/cache",
            "XDG_CONFIG_HOME": home + "/config",
            "XDG_RUNTIME_DIR": home + "/run",
        }
        command = ["/usr/bin/python3", "-c", DEFINE, str(root)]
        if os.geteuid() == 0:
            for path in (root, root / "etc", root / "home", root / "etc" / "qemu.conf"):
                os.chown(path, NOBODY, NOBODY)
            command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                       *command]
        result = subprocess.run(
            command, input=json.dumps(domains), capture_output=True, text=True, env=env,
            timeout=120, check=False,
        )
        assert result.returncode == 0, result.stderr
        defined: dict[str, Any] = json.loads(result.stdout)
        return defined
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def defined() -> Iterator[dict[str, Any]]:
    domains, kvm_only = tcg_domains()
    # The unprivileged embed driver cannot open /dev/kvm here: these are only
    # schema-checked (test_fixtures.py), and this list says so.
    assert kvm_only == ["accel-kvm"]
    every = vm_of(
        "[VM]\nFirmware=uefi\nMachine=pc\nDisk=/dev/null,bus=ide\nDisk=/dev/null,bus=scsi\n"
        "CDROM=/dev/null\nNetwork=tap:t0\nNetwork=bridge:br0\nShutdownMode=acpi agent\n"
        "CPUModel=qemu64\nCPUs=2\nMemory=300M\n",
        name="agent-and-everything",
    )
    domains["agent-and-everything"] = domain.render(every, plan_of(every))
    # What settings.parse_disk refuses, built by hand: libvirt must refuse it too.
    for bus, machine in (("sata", "q35"), ("ide", "pc")):
        disk = Disk(Path("/dev/null"), format="raw", readonly=True, bus=bus)
        vm = vm_of(f"[VM]\nMachine={machine}\n", name=f"ro-{bus}")._replace(disks=(disk,))
        domains[f"refused-readonly-{bus}"] = domain.render(vm, plan_of(vm))
    yield define_all(domains)


def test_embed_driver_accepts_every_rendered_fixture(defined: dict[str, Any]) -> None:
    assert len(defined) >= 35
    refused = {k: v["error"] for k, v in defined.items() if v["error"]}
    assert refused == {
        "refused-readonly-sata": "unsupported configuration: readonly sata disks are not supported",
        "refused-readonly-ide": "unsupported configuration: readonly ide disks are not supported",
    }


def test_libvirt_reads_what_was_meant(defined: dict[str, Any]) -> None:
    minimal = root_of(defined["minimal"]["xml"])
    assert minimal.findtext("memory") == "524288"
    assert minimal.find("memory").get("unit") == "KiB"  # type: ignore[union-attr]
    assert minimal.find("devices/interface/model").get("type") == "virtio"  # type: ignore[union-attr]
    assert minimal.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    assert minimal.findall("devices/graphics") == []

    every = root_of(defined["agent-and-everything"]["xml"])
    assert every.findtext("vcpu") == "2"
    assert every.findtext("memory") == str(300 * 1024)
    assert every.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert every.findtext("os/nvram") == (
        "/var/lib/qemu-run/agent-and-everything/agent-and-everything_VARS.fd"
    )
    channel = every.find("devices/channel/target")
    assert channel is not None and channel.get("name") == "org.qemu.guest_agent.0"
    # libvirt keeps disks sorted by bus and target.
    buses = {t.get("dev"): t.get("bus") for t in every.findall("devices/disk/target")}
    assert buses == {"hda": "ide", "sda": "scsi", "hdb": "ide"}
    assert [i.get("type") for i in every.findall("devices/interface")] == ["ethernet", "bridge"]
    models = {c.get("model") for c in every.findall("devices/controller[@type='scsi']")}
    assert models == {"virtio-scsi"}


def test_rendered_uuid_and_macs_survive_libvirt(defined: dict[str, Any]) -> None:
    for fixture in fixtures():
        if fixture.name not in defined or fixture.file.suffix != ".vm":
            continue
        vm = load_fixture(fixture)
        got = root_of(defined[fixture.name]["xml"])
        assert got.findtext("uuid") == vm.domain_uuid()
        macs = [m.get("address") for m in got.findall("devices/interface/mac")]
        # Interfaces given to QEMU directly (PublishPort=...) carry theirs in -device.
        args = got.iterfind(f"{{{domain.QEMU_NS}}}commandline/{{{domain.QEMU_NS}}}arg")
        macs += [o[4:] for a in args for o in a.get("value", "").split(",")
                 if o.startswith("mac=")]
        assert sorted(macs) == sorted(vm.macs())


# Rendering without libvirt.


def render(vm: VMConfig, accel: str = "tcg") -> ET.Element:
    return root_of(domain.render(vm, plan_of(vm, accel)))


def test_kvm_domain_uses_host_passthrough_by_default() -> None:
    root = render(vm_of("[VM]\n"), "kvm")
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_host_cpu_models_need_kvm() -> None:
    vm = vm_of("[VM]\nCPUModel=host-passthrough\n")
    with pytest.raises(ConfigError) as info:
        render(vm, "tcg")
    assert info.value.key == "CPUModel"
    assert render(vm, "kvm").find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_uefi_variables_live_in_the_state_directory() -> None:
    root = render(vm_of("[VM]\nFirmware=uefi\n"))
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert root.findtext("os/nvram") == "/var/lib/qemu-run/web/web_VARS.fd"


def test_console_and_agent_are_the_runners_sockets() -> None:
    root = render(vm_of("[VM]\nShutdownMode=agent acpi\n"))
    [serial] = root.findall("devices/serial")
    assert serial.get("type") == "unix"
    assert serial.find("source").attrib == {  # type: ignore[union-attr]
        "mode": "connect", "path": "/run/qemu-run/web/console.sock",
    }
    assert root.findall("devices/console") == []  # libvirt mirrors serial 0 itself
    [channel] = root.findall("devices/channel")
    assert channel.find("source").attrib == {  # type: ignore[union-attr]
        "mode": "bind", "path": "/run/qemu-run/web/agent.sock",
    }
    assert render(vm_of("[VM]\nConsole=none\n")).findall("devices/serial") == []


def test_target_names_continue_past_z() -> None:
    disks = "".join("Disk=/dev/null\n" for _ in range(28))
    root = render(vm_of(f"[VM]\n{disks}CDROM=/dev/null\n"))
    devs = [t.get("dev") for t in root.findall("devices/disk/target")]
    assert devs[:2] == ["vda", "vdb"] and devs[25:28] == ["vdz", "vdaa", "vdab"]
    assert devs[28] == "sda"  # the CD-ROM, on SATA for q35
    assert len(set(devs)) == len(devs)


def test_block_devices_are_block_disks() -> None:
    block = next(
        (e.path for e in os.scandir("/dev") if stat.S_ISBLK(e.stat(follow_symlinks=False).st_mode)),
        None,
    )
    assert block is not None, "this test needs a block device in /dev (e.g. /dev/loop0)"
    root = render(vm_of(f"[VM]\nDisk={block},format=raw\n"))
    disk = root.find("devices/disk")
    assert disk is not None and disk.get("type") == "block"
    assert disk.find("source").get("dev") == block  # type: ignore[union-attr]


def test_probed_format_is_rendered(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    root = render(vm_of(f"[VM]\nDisk={image},readonly\n"))
    assert root.find("devices/disk/driver").get("type") == "qcow2"  # type: ignore[union-attr]


def test_text_is_escaped_not_spliced() -> None:
    vm = vm_of("[VM]\nKernel=/k\nKernelCmdline=a='<b>' & \"c\"\n")
    assert render(vm).findtext("os/cmdline") == "a='<b>' & \"c\""


# Taking over a DomainXML= VM's own domain.

VIRSH_XML = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>old</name>
  <memory>262144</memory>
  <os firmware='efi'><type>hvm</type></os>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <console type='pty'><target type='virtio' port='1'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/long/path/ga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
  <qemu:commandline><qemu:arg value='-no-reboot'/></qemu:commandline>
</domain>"""


def take_over(tmp_path: Path, xml: str, keys: str = "", accel: str = "tcg") -> ET.Element:
    path = tmp_path / "web.xml"
    path.write_text(xml)
    return render(vm_of(f"[VM]\nDomainXML={path}\n{keys}"), accel)


def test_name_type_console_agent_and_nvram_are_taken_over(tmp_path: Path) -> None:
    root = take_over(tmp_path, VIRSH_XML)
    assert root.findtext("name") == "web"
    assert root.get("type") == "qemu"  # as planned: TCG
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
    assert root.findtext("os/nvram") == "/var/lib/qemu-run/web/web_VARS.fd"
    # The QEMU namespace keeps its prefix (libvirt matches the URI; people read the prefix).
    text = domain.serialize(root)
    assert "<qemu:commandline>" in text and "<qemu:arg value=\"-no-reboot\" />" in text


def test_a_domain_without_serial_gets_one(tmp_path: Path) -> None:
    root = take_over(tmp_path, "<domain type='qemu'><name>x</name></domain>")
    [serial] = root.findall("devices/serial")
    assert serial.get("type") == "unix"


def test_console_none_leaves_serial_alone(tmp_path: Path) -> None:
    root = take_over(tmp_path, VIRSH_XML, "Console=none\n")
    assert root.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]


def test_an_explicit_nvram_path_is_kept(tmp_path: Path) -> None:
    xml = VIRSH_XML.replace("<type>hvm</type>", "<type>hvm</type><nvram>/srv/v.fd</nvram>")
    assert take_over(tmp_path, xml).findtext("os/nvram") == "/srv/v.fd"
