"""A DomainXML= file as the configuration layer sees it: parsed with a depth limit, and the
host paths it names (what the generator opens in the sandbox, what the host plan checks).

Standard library only: the generator imports this at boot for DomainXML= VMs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from qemu_unit.config.files import DOMAIN_XML_MAX, read_config
from qemu_unit.errors import ConfigError
from qemu_unit.records import NamedTuple

# ElementTree serialises (and copies) recursively: a hostile nesting depth would end
# in a RecursionError. libvirt's own domain XML is a dozen levels deep.
MAX_XML_DEPTH = 100


def read_domain_xml(path: Path) -> ET.Element:
    """The <domain> of a DomainXML= file, parsed and no deeper than MAX_XML_DEPTH."""
    try:
        text = read_config(path, DOMAIN_XML_MAX, what="domain XML").decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid UTF-8"
        raise ConfigError(f"cannot read domain XML: {reason}", path=path) from None
    return parse_domain_xml(text, path)


def parse_domain_xml(text: str, path: Path) -> ET.Element:
    """The <domain> of TEXT read from PATH, no deeper than MAX_XML_DEPTH."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ConfigError(f"invalid XML: {e}", path=path, line=e.position[0]) from None
    if root.tag != "domain":
        raise ConfigError(f"the root element is <{root.tag}>, not <domain>", path=path)
    # Iterative on purpose: this is what stands between the file and recursion.
    level = [root]
    for _ in range(MAX_XML_DEPTH):
        level = [child for element in level for child in element]
        if not level:
            return root
    raise ConfigError(f"elements nested deeper than {MAX_XML_DEPTH} levels", path=path)


class HostPath(NamedTuple):
    """A host path a domain XML names: KIND is 'file', 'dir' or 'exec'."""

    tag: str
    path: str
    writable: bool
    kind: str = "file"


def xml_paths(root: ET.Element) -> list[HostPath]:
    """Each host path a domain names that must exist when it starts: disks (files, block
    devices, directories, backing files), filesystem sources, kernel, initrd, device
    tree, firmware, ACPI tables, fw_cfg files, the emulator. Not the NVRAM file:
    libvirt makes it from a template."""
    out: list[HostPath] = []
    for disk in root.iterfind("./devices/disk"):
        src = disk.find("source")
        writable = disk.find("readonly") is None and disk.get("device") != "cdrom"
        if src is not None:
            if src.get("file") or src.get("dev"):
                out.append(HostPath("disk", src.get("file") or src.get("dev") or "", writable))
            elif src.get("dir"):
                out.append(HostPath("disk", src.get("dir") or "", writable, "dir"))
        for backing in disk.iterfind(".//backingStore/source"):
            if backing.get("file") or backing.get("dev"):
                out.append(HostPath("backingStore", backing.get("file") or backing.get("dev")
                                    or "", False))
    for fs in root.iterfind("./devices/filesystem"):
        src = fs.find("source")
        if src is None:
            continue
        writable = fs.find("readonly") is None
        if fs.get("type", "mount") == "mount" and src.get("dir"):
            out.append(HostPath("filesystem", src.get("dir") or "", writable, "dir"))
        elif src.get("file") or src.get("dev"):
            out.append(HostPath("filesystem", src.get("file") or src.get("dev") or "", writable))
    for tag in ("kernel", "initrd", "dtb", "loader", "acpi/table"):
        text = (root.findtext(f"./os/{tag}") or "").strip()
        if text:
            out.append(HostPath(tag.rpartition("/")[2], text, False))
    for entry in root.iterfind("./sysinfo/entry"):
        if entry.get("file"):
            out.append(HostPath("sysinfo", entry.get("file") or "", False))
    emulator = (root.findtext("./devices/emulator") or "").strip()
    if emulator:
        out.append(HostPath("emulator", emulator, False, "exec"))
    return out


_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}  # fmt: skip


def resources(root: ET.Element) -> tuple[int | None, int | None]:
    """(memory in bytes, vCPUs) a <domain> asks for; None for what it does not say."""
    memory = cpus = None
    el = root.find("memory")
    if el is not None and el.text:
        scale = _UNITS.get(el.get("unit", "KiB").lower())
        if scale is not None and el.text.strip().isdigit():
            memory = int(el.text) * scale
    el = root.find("vcpu")
    if el is not None and el.text and el.text.strip().isdigit():
        cpus = int(el.text)
    return memory, cpus
