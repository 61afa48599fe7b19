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

from qemu_unit import domain
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.settings import Accel, Disk, VMConfig, parse_vm, stable_uuid
from qemu_unit.unitfile import UnitFile, parse
from tests.test_fixtures import NVRAM_DIR, fixtures, load_fixture

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
        out[f.name] = domain.render(vm, "tcg", nvram_dir=NVRAM_DIR / vm.name)
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
    domains["agent-and-everything"] = domain.render(
        vm_of(
            "[VM]\nFirmware=uefi\nMachine=pc\nDisk=/dev/null,bus=ide\nDisk=/dev/null,bus=scsi\n"
            "CDROM=/dev/null\nNetwork=tap:t0\nNetwork=bridge:br0\nShutdownMode=acpi agent\n"
            "CPUModel=qemu64\nCPUs=2\nMemory=300M\n",
            name="agent-and-everything",
        ),
        "tcg",
        nvram_dir=Path("/var/lib/qemu-run/x"),
    )
    # What settings.parse_disk refuses, built by hand: libvirt must refuse it too.
    for bus, machine in (("sata", "q35"), ("ide", "pc")):
        disk = Disk(Path("/dev/null"), format="raw", readonly=True, bus=bus)
        vm = VMConfig(name=f"ro-{bus}", source_path=Path("/x.vm"), machine=machine,
                      disks=(disk,), uuid=stable_uuid(f"ro-{bus}"))
        domains[f"refused-readonly-{bus}"] = domain.render(vm, "tcg")
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
    assert every.findtext("os/nvram") == "/var/lib/qemu-run/x/agent-and-everything_VARS.fd"
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
        assert macs == list(vm.macs())


# Rendering without libvirt.


def test_kvm_domain_uses_host_passthrough_by_default() -> None:
    root = root_of(domain.render(vm_of("[VM]\n"), "kvm"))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_render_needs_a_decided_accelerator() -> None:
    with pytest.raises(QemuUnitError, match="the runner picks kvm or tcg"):
        domain.render(vm_of("[VM]\n"), "auto")  # type: ignore[arg-type]
    with pytest.raises(QemuUnitError, match="Accel=tcg"):
        domain.render(vm_of("[VM]\nAccel=tcg\n"), "kvm")


def test_host_cpu_models_need_kvm() -> None:
    vm = vm_of("[VM]\nCPUModel=host-passthrough\n")
    with pytest.raises(ConfigError) as info:
        domain.render(vm, "tcg")
    assert info.value.key == "CPUModel"
    assert root_of(domain.render(vm, "kvm")).find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_uefi_without_nvram_dir_leaves_the_path_to_libvirt() -> None:
    root = root_of(domain.render(vm_of("[VM]\nFirmware=uefi\n"), "tcg"))
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert root.find("os/nvram") is None


def test_target_names_continue_past_z() -> None:
    disks = "".join("Disk=/dev/null\n" for _ in range(28))
    root = root_of(domain.render(vm_of(f"[VM]\n{disks}CDROM=/dev/null\n"), "tcg"))
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
    root = root_of(domain.render(vm_of(f"[VM]\nDisk={block},format=raw\n"), "tcg"))
    disk = root.find("devices/disk")
    assert disk is not None and disk.get("type") == "block"
    assert disk.find("source").get("dev") == block  # type: ignore[union-attr]


def test_probed_format_is_rendered(tmp_path: Path) -> None:
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    root = root_of(domain.render(vm_of(f"[VM]\nDisk={image}\n"), "tcg"))
    assert root.find("devices/disk/driver").get("type") == "qcow2"  # type: ignore[union-attr]


def test_text_is_escaped_not_spliced() -> None:
    vm = vm_of("[VM]\nKernel=/k\nKernelCmdline=a='<b>' & \"c\"\n")
    root = root_of(domain.render(vm, "tcg"))
    assert root.findtext("os/cmdline") == "a='<b>' & \"c\""


def test_domain_xml_is_returned_unchanged(tmp_path: Path) -> None:
    text = (
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n"
        "  <name>x</name><qemu:commandline><qemu:arg value='-no-reboot'/></qemu:commandline>\n"
        "</domain>\n"
    )
    path = tmp_path / "x.xml"
    path.write_text(text)
    vm = vm_of(f"[VM]\nDomainXML={path}\nAccel=auto\n")
    assert domain.render(vm, "tcg") == text


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read domain XML"), (b"<domain>", "invalid XML"),
     (b"\xff<domain/>", "not valid UTF-8"), (b"<network/>", "not <domain>")],
)
def test_bad_domain_xml(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.xml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        domain.render(vm_of(f"[VM]\nDomainXML={path}\n"), "tcg")
    assert info.value.path == str(path)
