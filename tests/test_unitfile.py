"""unitfile.py: unit-file syntax as systemd reads it, each value with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_unit.config.unitfile import LINE_MAX, Entry, UnitFile, format_line, parse, read
from qemu_unit.errors import ConfigError


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


def test_continuation_replaces_the_backslash_and_keeps_the_next_line_as_written() -> None:
    # systemd: the backslash becomes a space, the next line is appended with its
    # indentation; only the ends of the joined line are stripped.
    text = "[VM]\nKernelCmdline=console=ttyS0 \\\n   quiet \\\n   rw\nCPUs=2\n"
    assert values(text) == [
        ("VM", "KernelCmdline", "console=ttyS0     quiet     rw", 2),
        ("VM", "CPUs", "2", 5),
    ]
    assert values('[Service]\nEnvironment="A=x\\\n  y"\n') == [
        ("Service", "Environment", '"A=x   y"', 2)
    ]


def test_comment_inside_a_continuation_is_dropped() -> None:
    text = "[VM]\nKernelCmdline=a \\\n# not part of it\n  ; nor this\n b\n"
    assert values(text) == [("VM", "KernelCmdline", "a   b", 2)]


def test_a_comment_never_continues() -> None:
    # A commented-out multi-line ExecStart= must not swallow the next line.
    text = "[Service]\n#ExecStart=/bin/a \\\nExecStop=/bin/b\n"
    assert values(text) == [("Service", "ExecStop", "/bin/b", 3)]
    text = "[Service]\n  ; x \\\n[Unit]\nDescription=d\n"
    assert values(text) == [("Unit", "Description", "d", 4)]


def test_a_comment_before_a_section_does_not_hide_it(tmp_path: Path) -> None:
    # The misleading "Description=: unknown key in [VM]" of issue 11.
    from qemu_unit.config import settings, source

    path = tmp_path / "web.vm"
    path.write_text("[VM]\nMemory=1G\n# Network=user \\\n[Unit]\nDescription=web\n")
    vm = settings.load_vm(source.Source("web", "vm", path))
    assert [(e.key, e.value) for e in vm.unit] == [("Description", "web")]


def test_whitespace_after_a_backslash_ends_the_line() -> None:
    assert values("[VM]\nKernelCmdline=a\\ \nCPUs=2\n") == [
        ("VM", "KernelCmdline", "a\\", 2),
        ("VM", "CPUs", "2", 3),
    ]
    assert values("[VM]\nKernelCmdline=a\\\t\nCPUs=2\n") == [
        ("VM", "KernelCmdline", "a\\", 2),
        ("VM", "CPUs", "2", 3),
    ]


@pytest.mark.parametrize(
    ("slashes", "continues"), [(1, True), (2, False), (3, True), (4, False), (5, True)]
)
def test_only_an_odd_number_of_trailing_backslashes_continues(
    slashes: int, continues: bool
) -> None:
    run = "\\" * slashes
    got = values(f"[VM]\nKernelCmdline=a{run}\nCPUs=2\n")
    if continues:
        # The last backslash became a space; the others are the value's.
        assert got == [("VM", "KernelCmdline", f"a{run[1:]} CPUs=2", 2)]
    else:
        assert got == [("VM", "KernelCmdline", f"a{run}", 2), ("VM", "CPUs", "2", 3)]


def test_a_blank_line_ends_a_continuation() -> None:
    assert values("[VM]\nKernelCmdline=a\\\n\nCPUs=2\n") == [
        ("VM", "KernelCmdline", "a", 2),
        ("VM", "CPUs", "2", 4),
    ]


def test_continuation_at_end_of_file() -> None:
    assert values("[VM]\nKernelCmdline=a \\") == [("VM", "KernelCmdline", "a", 2)]
    assert values("[VM]\nKernelCmdline=a \\\n") == [("VM", "KernelCmdline", "a", 2)]


def test_crlf_and_cr_line_ends() -> None:
    assert values("[VM]\r\nCPUs=2\r\nMemory=1G\rMachine=pc") == [
        ("VM", "CPUs", "2", 2),
        ("VM", "Memory", "1G", 3),
        ("VM", "Machine", "pc", 4),
    ]


@pytest.mark.parametrize(
    ("ends", "lines"),
    [("\n\r", 1), ("\r\n", 1), ("\n\n", 2), ("\r\r", 2), ("\r\n\r", 2), ("\n\r\n", 2)],
)
def test_line_end_pairs_count_once(ends: str, lines: int) -> None:
    # read_line_full(): "\n\r" and "\r\n" are one line end, a repeated one is another.
    assert values(f"[VM]{ends}CPUs=2\n") == [("VM", "CPUs", "2", 1 + lines)]


@pytest.mark.parametrize("char", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028"])
def test_only_newlines_end_lines(char: str) -> None:
    # str.splitlines() would split here and shift every later line number.
    text = f"[VM]\nKernelCmdline=a{char}b\nCPUs=2\n"
    assert values(text) == [("VM", "KernelCmdline", f"a{char}b", 2), ("VM", "CPUs", "2", 3)]


def test_only_systemd_whitespace_is_stripped() -> None:
    assert values("[VM]\nKernelCmdline=\xa0x\x0c\n") == [("VM", "KernelCmdline", "\xa0x\x0c", 2)]


def test_entries_keep_file_order_across_sections() -> None:
    unit = UnitFile("/x", tuple(parse("[VM]\nA=1\n[Unit]\nB=2\n[VM]\nC=3\n", "/x")))
    assert [(e.section, e.key, e.value) for e in unit.entries] == [
        ("VM", "A", "1"), ("Unit", "B", "2"), ("VM", "C", "3")
    ]


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        ("[VM\nA=1\n", 1, None, "invalid section header"),
        ("[]\n", 1, None, "invalid section header"),
        ("[VM]\njust words\n", 2, None, "expected KEY=VALUE"),
        ("[VM]\n=value\n", 2, None, "invalid key name ''"),
        ("[VM]\nbad key=1\n", 2, None, "invalid key name 'bad key'"),
        ("Memory=1G\n[VM]\n", 1, "Memory", "assignment outside of any section"),
        ("[VM]\r\nA=1\nB=\0\n", 3, None, "NUL byte"),
        ("\ufeff[VM]\n\ufeffA=1\n", 2, None, "byte order mark"),
        ("# x\n\ufeff[VM]\n\ufeff[Unit]\n", 3, None, "byte order mark"),
        ("[VM]\nA=caf\udce9\n", 2, "A", "not valid UTF-8"),
        ("[VM]\nA=\uffff\n", 2, "A", "not valid UTF-8"),
        ("[VM]\nA=\ufdd0\n", 2, "A", "not valid UTF-8"),
        ("[VM]\nA=\U0010fffe\n", 2, "A", "not valid UTF-8"),
        ("[VM]\nA=x\\\n caf\udce9\n", 2, "A", "not valid UTF-8"),
        ("[VM]\n\udce9\n", 2, None, "not valid UTF-8"),
        ("\ufeff#caf\udce9\n", 1, None, "not valid UTF-8"),
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


def test_messages_quote_a_long_line_cut_short() -> None:
    with pytest.raises(ConfigError) as info:
        parse("[VM]\n" + "x" * 5000 + "\n", "/x.vm")
    assert str(info.value) == f"/x.vm:2: expected KEY=VALUE, got {'x' * 80!r}..."


def test_read_skips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.vm"
    path.write_bytes(b"\xef\xbb\xbf[VM]\nCPUs=2\n")
    assert [(e.key, e.line) for e in read(path).entries] == [("CPUs", 2)]


def test_read_skips_the_first_mark_at_the_start_of_a_line(tmp_path: Path) -> None:
    # systemd skips one mark: on the first line that starts with one, not only line 1.
    path = tmp_path / "bom.vm"
    path.write_bytes(b"# comment\n\xef\xbb\xbf[VM]\nCPUs=2\nKernelCmdline=a\xef\xbb\xbfb\n")
    assert [(e.key, e.value, e.line) for e in read(path).entries] == [
        ("CPUs", "2", 3), ("KernelCmdline", "a\ufeffb", 4)
    ]


def test_a_mark_before_a_comment_makes_it_a_line_that_continues() -> None:
    # systemd looks for comments before it skips the mark: this line is not a
    # comment, it continues, and the joined "# ..." line is ignored (no known key).
    with pytest.raises(ConfigError, match="outside of any section") as info:
        values("\ufeff# c \\\n[VM]\nA=1\n")
    assert info.value.line == 3
    assert values("[VM]\n\ufeff# c \\\nCPUs=2\nMemory=1G\n") == [("VM", "Memory", "1G", 4)]


def test_bytes_that_are_not_utf8_are_fine_in_comments(tmp_path: Path) -> None:
    path = tmp_path / "latin1.vm"
    path.write_bytes(b"# caf\xe9\n[VM]\n  ; \xff\xfe\nCPUs=2\nKernelCmdline=a \\\n#\xe9\n b\n")
    assert [(e.key, e.value) for e in read(path).entries] == [
        ("CPUs", "2"), ("KernelCmdline", "a   b")
    ]


def test_line_length_limit_is_systemds(tmp_path: Path) -> None:
    # LONG_LINE_MAX: a line of LINE_MAX bytes is too long, joined lines may reach it.
    key = b"KernelCmdline="
    path = tmp_path / "long.vm"
    path.write_bytes(b"[VM]\n" + key + b"x" * (LINE_MAX - 1 - len(key)) + b"\n")
    assert len(read(path).entries[0].value) == LINE_MAX - 1 - len(key)
    path.write_bytes(b"[VM]\n" + key + b"x" * (LINE_MAX - len(key)) + b"\n")
    with pytest.raises(ConfigError, match="line too long") as info:
        read(path)
    assert (info.value.path, info.value.line, info.value.key) == (str(path), 2, "KernelCmdline")
    # Also a comment: systemd fails to read the line before it sees the "#".
    path.write_bytes(b"[VM]\n#" + "\u00e9".encode() * (LINE_MAX // 2) + b"\n")
    with pytest.raises(ConfigError, match="line too long"):
        read(path)
    half = LINE_MAX // 2
    rest = LINE_MAX - half - 1 - len(key)
    path.write_bytes(b"[VM]\n" + key + b"x" * half + b"\\\n" + b"y" * rest + b"\n")
    assert len(read(path).entries[0].value) == LINE_MAX - len(key)
    path.write_bytes(b"[VM]\n" + key + b"x" * half + b"\\\n" + b"y" * (rest + 1) + b"\n")
    with pytest.raises(ConfigError, match="continued line too long") as info:
        read(path)
    assert (info.value.line, info.value.key) == (2, "KernelCmdline")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_format_value_reads_back_as_the_value(value: str) -> None:
    # Whatever parse() can give as a value, written by format_line(), parses back equal.
    text = f"[Service]\nEnvironment={value}\nX-After=1\n"
    try:
        entries = parse(text, "/x")
    except ConfigError:
        return
    if not entries or entries[0].key != "Environment":
        return
    read_value = entries[0].value
    written = "[Service]\n" + format_line("Environment", read_value) + "X-After=1\n"
    assert [(e.key, e.value) for e in parse(written, "/y")] == [
        ("Environment", read_value), ("X-After", "1")
    ]


@pytest.mark.parametrize("value", ["a\\", "a\\\\\\", "\\", "a \\ b\\"])
def test_format_value_stops_a_trailing_backslash_from_continuing(value: str) -> None:
    written = "[Service]\n" + format_line("Environment", value) + "ExecStop=/b\n"
    assert [(e.key, e.value) for e in parse(written, "/y")] == [
        ("Environment", value), ("ExecStop", "/b")
    ]
    assert format_line("A", "a\\\\") == "A=a\\\\\n"


def test_format_line_refuses_what_systemd_cannot_read_in_one_line() -> None:
    entry = Entry("Service", "Environment", "x", "/etc/qemu-run/web.vm", 7)
    with pytest.raises(ConfigError, match="too long") as info:
        format_line("Environment", "x" * LINE_MAX, entry)
    assert str(info.value).startswith("/etc/qemu-run/web.vm:7: Environment=: ")


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.vm"
    bad.write_bytes(b"[VM]\nKernelCmdline=caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8") as info:
        read(bad)
    assert (info.value.path, info.value.line) == (str(bad), 2)
    missing = tmp_path / "missing.conf"
    with pytest.raises(ConfigError, match="cannot read") as info:
        read(tmp_path / "nope.vm")
    assert info.value.path == str(tmp_path / "nope.vm")
    good = tmp_path / "good.vm"
    good.write_text("[VM]\n")
    with pytest.raises(ConfigError) as info:
        read(good, [missing])
    assert info.value.path == str(missing)
