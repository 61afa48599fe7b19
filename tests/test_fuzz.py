"""Property: no input makes the .vm parser fail with anything but a QemuUnitError.

A crash (KeyError, OverflowError, RecursionError...) would make the generator
drop every VM instead of reporting the one bad file.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu_unit.config import unitfile
from qemu_unit.config.names import check_name
from qemu_unit.config.settings import SETTINGS, parse_vm
from qemu_unit.errors import QemuUnitError
from qemu_unit.vm import domain
from tests.test_fixtures import plan_of

KEYS = [s.name for s in SETTINGS] + ["Memroy", "WantedBy", "Description", "", "a b", "=", "é"]
SECTIONS = ["VM", "Unit", "Service", "Install", "vm", "", "[VM]", "Container", "V\nM"]
VALUE_PARTS = [
    "", " ", "0", "1", "-1", "1.5", "512M", "2G", "9" * 30, "1e9", "K", "M", "min", "s",
    "auto", "kvm", "tcg", "uefi", "bios", "journal", "none", "user", "tap:", "bridge:",
    "agent", "acpi", "started", "console:", "(", "[", "*", "\\", "%", "%i", "%%", "%z",
    "/", "/srv/x.img", ",", ",,", "format=", "qcow2", "bus=", "ide", "sata", "readonly",
    "cache=", "52:54:00:00:00:01", "01:00:00:00:00:00", "=", "#", ";", "\t", "é", "\x00",
    "\x0c", "\u2028", "(" * 200,
]

values = st.lists(st.sampled_from(VALUE_PARTS) | st.text(max_size=8), max_size=6).map("".join)
lines = st.one_of(
    st.tuples(st.sampled_from(KEYS) | st.text(max_size=6), values).map(lambda kv: "=".join(kv)),
    st.sampled_from(SECTIONS).map(lambda s: f"[{s}]"),
    st.sampled_from(["", "#", "; x", "\\", "key \\", "[VM", "]"]),
    st.text(max_size=20),
)
documents = st.lists(lines, max_size=25).map("\n".join)
names = st.sampled_from(["web", "tmpl@blue", "a" * 41, "", "../x", "-x", "é"]) | st.text(
    max_size=12
)

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_and_render(text: str, name: str) -> None:
    try:
        unit = unitfile.UnitFile("/f.vm", tuple(unitfile.parse(text, "/f.vm")))
        vm = parse_vm(check_name(name), unit)  # source.find_source checks the name first
    except QemuUnitError:
        return
    # What parses must also render (or fail the same way) into well-formed XML.
    for accel in ("kvm", "tcg"):
        try:
            xml = domain.render(vm, plan_of(vm, accel))
        except QemuUnitError:
            continue
        if vm.domain_xml is None:
            assert ET.fromstring(xml).tag == "domain"


@FAST
@given(text=st.text(), name=names)
def test_arbitrary_text(text: str, name: str) -> None:
    parse_and_render(text, name)


@FAST
@given(text=st.text().map(lambda t: "[VM]\n" + t), name=names)
def test_arbitrary_text_in_vm_section(text: str, name: str) -> None:
    parse_and_render(text, name)


@FAST
@given(text=documents, name=names)
def test_structured_documents(text: str, name: str) -> None:
    parse_and_render("[VM]\n" + text, name)


@FAST
@given(key=st.sampled_from([s.name for s in SETTINGS]), value=values)
def test_every_key_with_odd_values(key: str, value: str) -> None:
    parse_and_render(f"[VM]\nKernel=/k\n{key}={value}\n", "web")


def test_fuzzing_reaches_the_renderer() -> None:
    # Guard against a strategy that never gets past the parser.
    assert Path(os.devnull).exists()
    vm = parse_vm("web", unitfile.UnitFile("/f", tuple(unitfile.parse("[VM]\nCPUs=2\n", "/f"))))
    assert "<vcpu>2</vcpu>" in domain.render(vm, plan_of(vm))
