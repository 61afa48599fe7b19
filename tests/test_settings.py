"""settings.py: the key table, the value parsers and VMConfig."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qemu_unit.config import settings
from qemu_unit.config.settings import (
    BY_NAME,
    SETTINGS,
    VMConfig,
    load_vm,
    parse_size,
    parse_timespan,
    parse_vm,
    stable_mac,
    stable_uuid,
)
from qemu_unit.config.source import Source
from qemu_unit.config.unitfile import Entry, UnitFile, parse
from qemu_unit.errors import ConfigError

ENTRY = Entry("VM", "Key", "", "/x.vm", 1)


def vm_of(text: str, name: str = "web") -> VMConfig:
    return parse_vm(name, UnitFile("/x.vm", tuple(parse(text, "/x.vm"))))


# The table.


def test_one_row_per_key_with_everything_the_man_page_needs() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    fields = set(VMConfig._fields)
    for s in SETTINGS:
        assert s.field in fields, s.name
        assert s.metavar, s.name
        assert len(s.help) > 20 and s.help.endswith("."), s.name
        # The man page says these from the columns (manpages._vm_key): the help must not.
        for restated in ("Defaults to " + (s.default or "?") + ".", "Allowed with DomainXML=.",
                         "empty assignment resets", "pecifiers are expanded"):
            assert restated not in s.help, f"{s.name}: the help restates a column: {restated}"


def test_choices_are_what_the_parser_accepts() -> None:
    for s in SETTINGS:
        for choice in s.choices:
            s.parse(choice, ENTRY)
        if s.choices:
            with pytest.raises(ConfigError):
                s.parse("no-such-choice", ENTRY)


def test_the_table_builds_every_field() -> None:
    # Each default is written once, in its row: VMConfig has none for the key fields.
    empty = vm_of("[VM]\n")
    keyed = {s.field for s in SETTINGS}
    for name in VMConfig._field_defaults:
        assert name not in keyed, f"{name} repeats its row's default"
    for s in SETTINGS:
        if s.default is not None and not s.repeatable:
            assert getattr(empty, s.field) == s.parse(s.default, ENTRY), s.name
        elif s.default is None and s.collect is None:
            assert getattr(empty, s.field) in (None, ()), s.name
    assert empty.networks == (settings.Network(settings.NetworkKind.USER, None),)
    assert empty.kernel_cmdline is None


def test_combination_rules_are_rows() -> None:
    # Each rule lives in the row of the key whose assignment the message names.
    assert BY_NAME["Initrd"].requires == BY_NAME["KernelCmdline"].requires == "Kernel"
    with pytest.raises(ConfigError, match="needs Kernel=") as info:
        vm_of("[VM]\nCPUs=2\nKernelCmdline=quiet\n")
    assert (info.value.line, info.value.key) == (3, "KernelCmdline")
    with pytest.raises(ConfigError, match="bus=ide is not available on Machine=q35") as info:
        vm_of("[VM]\nDisk=/a,bus=virtio\nDisk=/b,bus=ide\n")
    assert (info.value.line, info.value.key) == (3, "Disk")
    files = vm_of("[VM]\nKernel=/k\nDisk=/d\nCDROM=/c\n").files
    assert [(str(f.path), f.entry.key) for f in files if f.entry] == [
        ("/k", "Kernel"), ("/d", "Disk"), ("/c", "CDROM")
    ]


def test_table_keys_are_the_only_keys() -> None:
    with pytest.raises(ConfigError) as info:
        vm_of("[VM]\nMemorySize=1G\n")
    assert (info.value.line, info.value.key) == (2, "MemorySize")
    assert "did you mean Memory=?" in str(info.value)


# Value parsers.


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1024**2),
        ("1M", 1024**2),
        ("512M", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1.5G", 3 * 512 * 1024**2),
        ("0.5T", 512 * 1024**3),
        ("1024K", 1024**2),
        ("1 G", 1024**3),
        ("1P", 1024**5),
        ("2097152B", 2 * 1024**2),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text, ENTRY) == size


@pytest.mark.parametrize(
    "text", ["", "G", "1g", "1GiB", "1GB", "-1G", "1e9", "lots", "1023K", "2P", "１G", "1,5G"]
)
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text, ENTRY)
    assert (info.value.path, info.value.line, info.value.key) == ("/x.vm", 1, "Key")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("2min", 120.0),
        ("1min 30s", 90.0),
        ("1min30s", 90.0),
        ("500ms", 0.5),
        ("1h 1m 1s", 3661.0),
        ("2.5", 2.5),
        ("1 min", 60.0),
        ("0", 0.0),
        ("1d", 86400.0),
        ("250us", 0.00025),
    ],
)
def test_timespans(text: str, seconds: float) -> None:
    assert parse_timespan(text, ENTRY) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "-1s", "1x", "1e5", "infinity", "1 parsec", "9" * 400])
def test_bad_timespans(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid time span"):
        parse_timespan(text, ENTRY)


def test_stable_defaults_depend_on_the_name_only() -> None:
    web = stable_uuid("web")
    assert vm_of("[VM]\n").domain_uuid() == vm_of("[VM]\nCPUs=2\n").domain_uuid() == web
    assert stable_uuid("web") != stable_uuid("db")
    macs = {stable_mac("web", i) for i in range(50)} | {stable_mac("db", 0)}
    assert len(macs) == 51
    for mac in macs:
        first = int(mac[:2], 16)
        assert mac.startswith("52:54:00:") and not first & 1


def test_stable_defaults_never_change() -> None:
    # A VM keeps its UUID and MACs across upgrades: pinned values, and the UUID
    # is uuid5 in the documented namespace even though uuid itself is not used.
    import uuid

    namespace = uuid.uuid5(uuid.NAMESPACE_URL, settings.UUID_NAMESPACE_URL)
    for name in ("web", "base@inst", "host:8080", "x" * 40):
        assert stable_uuid(name) == str(uuid.uuid5(namespace, name))
    assert stable_uuid("web") == "ce446bcc-9572-59f1-975b-bb940f00fd37"
    assert stable_mac("web", 0) == "52:54:00:c5:07:b2"


def test_specifiers() -> None:
    vm = vm_of("[VM]\nKernel=/k/%n/%i/%p/100%%\n", name="tmpl@blue")
    assert vm.kernel == Path("/k/tmpl@blue/blue/tmpl/100%")
    assert vm_of("[VM]\nKernel=/k/%i-%p\n").kernel == Path("/k/web-web")
    for bad in ("%", "%z", "%I"):
        with pytest.raises(ConfigError, match="unknown specifier"):
            vm_of(f"[VM]\nKernel=/k/{bad}\n")


def test_no_specifiers_where_systemd_would_not() -> None:
    # A regex may well contain %; passthrough sections are the generator's.
    vm = vm_of("[VM]\nReady=console:100%i\n[Unit]\nDescription=%i\n")
    assert vm.ready.regex == "100%i"
    assert vm.unit[0].value == "%i"


def test_passthrough_entries_are_kept_with_their_lines() -> None:
    vm = vm_of("[Unit]\nAfter=a\n[Service]\nNice=5\n[Install]\nWantedBy=x y\nRequiredBy=z\n")
    assert [(e.key, e.line) for e in vm.unit] == [("After", 2)]
    assert [(e.key, e.value) for e in vm.service] == [("Nice", "5")]
    assert (vm.wanted_by, vm.required_by) == (("x", "y"), ("z",))


def test_extension_sections_and_vm_keys_are_ignored() -> None:
    # X- is the extension prefix: systemd ignores X- sections and keys, and so do we.
    vm = vm_of("[X-Backup]\nWhen=daily\n[VM]\nX-Owner=ops\nCPUs=2\n[Service]\nX-Note=1\n")
    assert vm.cpus == 2
    assert [(e.key, e.value) for e in vm.service] == [("X-Note", "1")]
    assert vm.unit == ()
    with pytest.raises(ConfigError, match="unknown section"):
        vm_of("[x-lower]\nA=1\n")


def test_load_vm_reads_the_file_and_its_dropins(tmp_path: Path) -> None:
    main = tmp_path / "web.vm"
    main.write_text("[VM]\nMemory=1G\nNetwork=user\n")
    dropin = tmp_path / "10.conf"
    dropin.write_text("[VM]\nMemory=2G\nNetwork=\n")
    vm = load_vm(Source("web", "vm", main, (dropin,)))
    assert (vm.memory, vm.networks, vm.source_path, vm.dropins) == (
        2 * 1024**3, (), main, (dropin,)
    )


def test_load_vm_of_an_xml_source_refuses_other_keys(tmp_path: Path) -> None:
    xml = tmp_path / "web.xml"
    xml.write_text("<domain/>")
    dropin = tmp_path / "10.conf"
    dropin.write_text("[VM]\nCPUs=2\n")
    with pytest.raises(ConfigError, match="not allowed with DomainXML=") as info:
        load_vm(Source("web", "xml", xml, (dropin,)))
    assert (info.value.path, info.value.line, info.value.key) == (str(dropin), 2, "CPUs")


def test_module_stays_import_light() -> None:
    # The generator imports settings at every boot: no libvirt, nothing heavy.
    code = (
        "import sys, qemu_unit.config.settings;"
        "bad = [m for m in ('libvirt', 'systemd', 'xml.etree.ElementTree') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run(["/usr/bin/python3", "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_enums_compare_as_strings() -> None:
    vm = vm_of("[VM]\nAccel=tcg\nNetwork=tap:t0\n")
    assert vm.accel == "tcg" and vm.networks[0].kind == "tap"
    assert settings.Accel.AUTO == "auto"


def test_origin_names_the_assignment_in_effect() -> None:
    vm = vm_of("[VM]\nMemory=1G\nMemory=2G\nDisk=/a\nDisk=\nDisk=/b\nCPUs=2\nCPUs=\n")
    memory = vm.origin("Memory")
    assert memory is not None and (memory.line, memory.value) == (3, "2G")
    disk = vm.origin("Disk")
    assert disk is not None and disk.line == 6
    assert vm.origin("CPUs") is None  # reset to the default
    assert vm.origin("Accel") is None


# The records (NamedTuples): what the dataclasses they replaced promised.


def test_a_value_is_the_same_whatever_line_set_it() -> None:
    one = vm_of("[VM]\nDisk=/a.img,readonly\nPublishPort=127.0.0.1:2222:22\nNetwork=user\n"
                "Share=/srv:srv\nSetCredential=k:v\n")
    # The same values from other lines of another file.
    two = parse_vm("web", UnitFile("/y.vm", tuple(parse(
        "[VM]\n\n\nNetwork=user\nShare=/srv:srv\nSetCredential=k:v\nDisk=/a.img,readonly\n"
        "PublishPort=127.0.0.1:2222:22\n", "/y.vm"))))
    for field in ("disks", "publish_ports", "shares", "credentials"):
        a, b = getattr(one, field)[0], getattr(two, field)[0]
        assert a.entry != b.entry, field
        assert a == b and not a != b and hash(a) == hash(b), field
        assert "entry" not in repr(a) and "/x.vm" not in repr(a), field
        # Unlike a plain tuple, a record is equal only to its own kind.
        assert a != tuple(a) and tuple(a) != a, field
    assert one.disks[0] != one.disks[0]._replace(readonly=False)
    assert settings.Disk(Path("/a.img")) == settings.Disk(Path("/a.img"), entry=ENTRY)


def test_a_credential_never_shows_its_value() -> None:
    cred = vm_of("[VM]\nSetCredential=token:t0ps3cret\n").credentials[0]
    assert cred.value == "t0ps3cret"
    assert "t0ps3cret" not in repr(cred) and "t0ps3cret" not in str(cred)
    assert repr(cred) == "Credential(id='token', path=None)"
