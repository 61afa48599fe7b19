"""unitfile.py: unit-file syntax as systemd reads it, each value with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_unit.errors import ConfigError
from qemu_unit.unitfile import Entry, UnitFile, parse, read


def values(text: str) -> list[tuple[str, str, str, int]]:
    return [(e.section, e.key, e.value, e.line) for e in parse(text, "/x.vm")]


def test_sections_keys_and_lines() -> None:
    text = "[VM]\nMemory=1G\n\n[Install]\nWantedBy=multi-user.target\n"
    assert values(text) == [
        ("VM", "Memory", "1G", 2),
        ("Install", "WantedBy", "multi-user.target", 5),
    ]


def test_comments_and_blank_lines_are_skipped() -> None:
    text = "# a comment\n; another\n[VM]\n  # indented\nCPUs=2\n"
    assert values(text) == [("VM", "CPUs", "2", 5)]


def test_whitespace_around_key_and_value_is_stripped() -> None:
    assert values("[VM]\n  Memory =  1G  \n") == [("VM", "Memory", "1G", 2)]


def test_value_keeps_inner_equals_and_spaces() -> None:
    assert values("[VM]\nKernelCmdline=root=/dev/vda  rw\n") == [
        ("VM", "KernelCmdline", "root=/dev/vda  rw", 2)
    ]


def test_repeated_keys_are_all_kept_in_order() -> None:
    text = "[VM]\nDisk=/a\nDisk=\nDisk=/b\n"
    assert [(e.value, e.line) for e in parse(text, "/x")] == [("/a", 2), ("", 3), ("/b", 4)]


def test_continuation_lines_join_with_a_space_and_keep_the_first_line() -> None:
    text = "[VM]\nKernelCmdline=console=ttyS0 \\\n   quiet \\\n   rw\nCPUs=2\n"
    assert values(text) == [
        ("VM", "KernelCmdline", "console=ttyS0 quiet rw", 2),
        ("VM", "CPUs", "2", 5),
    ]


def test_comment_inside_a_continuation_is_ignored() -> None:
    text = "[VM]\nKernelCmdline=a \\\n# not part of it\n b\n"
    assert values(text) == [("VM", "KernelCmdline", "a b", 2)]


def test_continuation_at_end_of_file() -> None:
    assert values("[VM]\nKernelCmdline=a \\") == [("VM", "KernelCmdline", "a", 2)]


def test_crlf_and_cr_line_ends() -> None:
    assert values("[VM]\r\nCPUs=2\r\nMemory=1G\rMachine=pc") == [
        ("VM", "CPUs", "2", 2),
        ("VM", "Memory", "1G", 3),
        ("VM", "Machine", "pc", 4),
    ]


@pytest.mark.parametrize("char", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028"])
def test_only_newlines_end_lines(char: str) -> None:
    # str.splitlines() would split here and shift every later line number.
    text = f"[VM]\nKernelCmdline=a{char}b\nCPUs=2\n"
    assert values(text) == [("VM", "KernelCmdline", f"a{char}b", 2), ("VM", "CPUs", "2", 3)]


def test_only_systemd_whitespace_is_stripped() -> None:
    assert values("[VM]\nKernelCmdline=\xa0x\x0c\n") == [("VM", "KernelCmdline", "\xa0x\x0c", 2)]


def test_sections_lists_in_first_seen_order() -> None:
    unit = UnitFile("/x", tuple(parse("[VM]\nA=1\n[Unit]\nB=2\n[VM]\nC=3\n", "/x")))
    assert unit.sections() == ["VM", "Unit"]
    assert [e.key for e in unit.section("VM")] == ["A", "C"]
    assert [e.value for e in unit.lookup("VM", "C")] == ["3"]
    assert unit.lookup("VM", "missing") == []


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        ("[VM\nA=1\n", 1, None, "invalid section header"),
        ("[]\n", 1, None, "invalid section header"),
        ("[VM]\njust words\n", 2, None, "expected KEY=VALUE"),
        ("[VM]\n=value\n", 2, None, "invalid key name ''"),
        ("[VM]\nbad key=1\n", 2, None, "invalid key name 'bad key'"),
        ("Memory=1G\n[VM]\n", 1, "Memory", "assignment outside of any section"),
        ("[VM]\nA=\0\n", None, None, "NUL byte"),
    ],
)
def test_syntax_errors_name_file_and_line(
    text: str, line: int | None, key: str | None, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "/etc/qemu-run/web.vm")
    assert info.value.path == "/etc/qemu-run/web.vm"
    assert info.value.line == line
    assert info.value.key == key
    assert message in str(info.value)


def test_read_applies_dropins_after_the_file(tmp_path: Path) -> None:
    main = tmp_path / "web.vm"
    main.write_text("[VM]\nMemory=1G\n")
    first = tmp_path / "a.conf"
    first.write_text("[VM]\nMemory=2G\n")
    second = tmp_path / "b.conf"
    second.write_text("\n[VM]\nCPUs=4\n")
    unit = read(main, [first, second])
    assert unit.path == str(main)
    assert unit.entries == (
        Entry("VM", "Memory", "1G", str(main), 2),
        Entry("VM", "Memory", "2G", str(first), 2),
        Entry("VM", "CPUs", "4", str(second), 3),
    )


def test_read_skips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.vm"
    path.write_bytes(b"\xef\xbb\xbf[VM]\nCPUs=2\n")
    assert [(e.key, e.line) for e in read(path).entries] == [("CPUs", 2)]


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.vm"
    bad.write_bytes(b"[VM]\nKernelCmdline=caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8") as info:
        read(bad)
    assert info.value.path == str(bad)
    missing = tmp_path / "missing.conf"
    with pytest.raises(ConfigError, match="cannot read") as info:
        read(tmp_path / "nope.vm")
    assert info.value.path == str(tmp_path / "nope.vm")
    good = tmp_path / "good.vm"
    good.write_text("[VM]\n")
    with pytest.raises(ConfigError) as info:
        read(good, [missing])
    assert info.value.path == str(missing)
