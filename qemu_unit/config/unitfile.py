"""systemd unit-file syntax, and nothing else: no keys, no libvirt.

Sections, comments, continuation lines, repeated keys and drop-ins, each value
remembered with the file and line it came from so that later stages can say
exactly where a bad value was written.

The rules are systemd 252's (config_parse() in src/shared/conf-parser.c,
read_line_full() in src/basic/fileio.c), checked against systemd itself by
tests/system/test_syntax_differential.py:

- Lines end at "\\n", "\\r", "\\r\\n" or "\\n\\r" (a pair is one line end; "\\n\\n" is two).
- A physical line of LINE_MAX bytes or more, or continuation lines joined to more
  than LINE_MAX bytes, make systemd stop reading the file there: refused.
- A comment is a line whose first character after whitespace is "#" or ";". It is
  skipped before anything else, so it never continues onto the next line, and a
  comment inside a continuation is dropped. Comments may hold any bytes.
- A line continues when it ends in an odd number of backslashes, with nothing
  (not even whitespace) after them: the last backslash becomes a space and the
  next line is appended exactly as written, indentation included. An even number
  is the value's own backslashes. A blank line ends a continuation.
- The first line that starts with a byte order mark loses it (one mark per file).
- Whitespace (space, tab, CR, LF only) is stripped around a logical line, a key
  and a value; a value keeps its inner whitespace as written.
- A logical line that is not valid UTF-8 makes systemd stop reading: refused.

Stricter than systemd, on purpose (each names file and line; see qemu-run.vm(5)):
a NUL byte (a line end for systemd), a line without "=", an empty or bracketed
section name, a key outside [A-Za-z0-9_.-], an assignment before any section.
systemd ignores these lines with a warning, which hides typos.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from qemu_unit.config.files import UNIT_FILE_MAX, read_config
from qemu_unit.errors import ConfigError
from qemu_unit.records import NamedTuple

# systemd's LONG_LINE_MAX (bytes): a line must be shorter, joined lines no longer.
LINE_MAX = 1024 * 1024
# The characters of a key name, for str.strip(): a key is valid when nothing is
# left. No regular expressions in the common path: this runs for every line of
# every file at boot.
_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
# systemd's WHITESPACE and line ends: str.strip() and str.splitlines() would also
# take form feeds, U+0085, U+2028 and friends, shifting line numbers and values.
_WHITESPACE = " \t\n\r"
_COMMENTS = ("#", ";")
_BOM = "\ufeff"
# "\r\n" and "\n\r" are one line end each (read_line_full()); tried left to right.
_LINE_END = re.compile("\r\n|\n\r|\r|\n")
# What systemd's utf8_is_valid() refuses beyond Python's UTF-8 decoder: U+FDD0..U+FDEF
# and U+xFFFE/U+xFFFF. Undecodable bytes arrive as surrogates (surrogateescape).
# A pattern, compiled by re.search() at its first use (~0.4 ms): an ASCII file never needs it.
_NOT_UTF8 = (
    "[\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(17))
    + "]"
)
_NOT_UTF8_MESSAGE = "not valid UTF-8 (systemd stops reading the file here)"


class Entry(NamedTuple):
    """One KEY=VALUE assignment, with the section, file and line it was read in."""

    section: str
    key: str
    value: str
    path: str
    line: int


class UnitFile(NamedTuple):
    """The entries of a file and its drop-ins, in the order they were read."""

    path: str
    entries: tuple[Entry, ...]


def _split_lines(text: str) -> list[str]:
    """TEXT split at line ends as systemd reads them, and at nothing else."""
    if "\r" not in text:
        return text.split("\n")
    return _LINE_END.split(text)


def _size(text: str) -> int:
    """TEXT's length in bytes as systemd counts it (undecodable bytes count one)."""
    return len(text.encode("utf-8", "surrogateescape"))


def _logical_lines(text: str, path: str) -> Iterable[tuple[int, str]]:
    """(first line number, line) for each line, continuation lines joined."""
    lines = _split_lines(text)
    if "\\" not in text and _BOM not in text and len(text) * 4 < LINE_MAX:
        # No continuation, no mark, no line near the limit (nearly every
        # file): each line stands alone and comments are skipped by parse().
        return enumerate(lines, 1)
    return _join_continuations(lines, path, check_size=len(text) * 4 >= LINE_MAX)


def _join_continuations(
    lines: list[str], path: str, *, check_size: bool
) -> Iterator[tuple[int, str]]:
    start = 0
    joined: str | None = None  # the continuation so far, its last backslash made a space
    bom_seen = False
    for number, line in enumerate(lines, 1):
        if check_size and _size(line) >= LINE_MAX:
            raise ConfigError(
                f"line too long (systemd reads lines of at most {LINE_MAX - 1} bytes)",
                path=path, line=number, key=_key_of(line if joined is None else joined),
            )
        # Comments first: they neither continue nor end a continuation.
        if line.lstrip(_WHITESPACE)[:1] in _COMMENTS:
            continue
        if not bom_seen and line.startswith(_BOM):
            line = line[1:]
            bom_seen = True
        if joined is None:
            start = number
            text = line
        else:
            if check_size and _size(joined) + _size(line) > LINE_MAX:
                raise ConfigError(
                    f"continued line too long (systemd joins at most {LINE_MAX} bytes)",
                    path=path, line=start, key=_key_of(joined),
                )
            text = joined + line
        # The joined part ends in a space, so the count of trailing backslashes
        # is that of this line alone.
        if (len(line) - len(line.rstrip("\\"))) % 2:
            joined = text[:-1] + " "
            continue
        joined = None
        if _is_assignment_or_section(start, text, path):
            yield start, text
    if joined is not None and _is_assignment_or_section(start, joined, path):
        yield start, joined


def _is_assignment_or_section(number: int, text: str, path: str) -> bool:
    """False if TEXT starts with "#" or ";" (possible only once a byte order mark
    is gone): systemd then checks its UTF-8 and ignores it (no key it knows)."""
    if text.lstrip(_WHITESPACE)[:1] not in _COMMENTS:
        return True
    if re.search(_NOT_UTF8, text):
        raise ConfigError(_NOT_UTF8_MESSAGE, path=path, line=number)
    return False


def _key_of(line: str) -> str | None:
    """The key LINE assigns, for messages about the whole line (None: not an assignment)."""
    key, sep, _ = line.partition("=")
    key = key.strip(_WHITESPACE)
    if sep and key and not key.strip(_KEY_CHARS):
        return key
    return None


def _shown(text: str) -> str:
    """TEXT quoted for a message, cut short: a line may be a megabyte long."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def _nul_line(text: str) -> int:
    return len(_split_lines(text[: text.index("\0")]))


def parse(text: str, path: str | Path) -> list[Entry]:
    """Parse unit-file TEXT read from PATH (used in messages only).

    TEXT is decoded with "surrogateescape" (read() does): bytes that are not
    UTF-8 are fine in comments and refused elsewhere, as systemd does.
    """
    path = str(path)
    if "\0" in text:
        raise ConfigError("file contains a NUL byte", path=path, line=_nul_line(text))
    ascii_only = text.isascii()
    section: str | None = None
    entries: list[Entry] = []
    for number, raw in _logical_lines(text, path):
        line = raw.strip(_WHITESPACE)
        if not line or line[0] in _COMMENTS:
            continue
        if not ascii_only and re.search(_NOT_UTF8, line):
            raise ConfigError(_NOT_UTF8_MESSAGE, path=path, line=number, key=_key_of(line))
        if line[0] == _BOM:
            raise ConfigError(
                "byte order mark (U+FEFF) at the start of a line: only the first is skipped",
                path=path, line=number,
            )
        if line[0] == "[":
            name = line[1:-1]
            if line[-1] != "]" or not name or "[" in name or "]" in name:
                raise ConfigError(f"invalid section header {_shown(line)}", path=path, line=number)
            section = name
            continue
        key, sep, value = line.partition("=")
        key = key.rstrip(_WHITESPACE)
        if not sep:
            raise ConfigError(
                f"expected KEY=VALUE, got {_shown(line)}", path=path, line=number
            )
        if not key or key.strip(_KEY_CHARS):
            raise ConfigError(f"invalid key name {_shown(key)}", path=path, line=number)
        if section is None:
            raise ConfigError(
                "assignment outside of any section", path=path, line=number, key=key
            )
        entries.append(Entry(section, key, value.lstrip(_WHITESPACE), path, number))
    return entries


def format_value(value: str) -> str:
    """VALUE written after "KEY=" so that systemd reads back exactly VALUE.

    VALUE is what parse() gave: no line end, no whitespace at either end. Only
    an odd number of trailing backslashes would change meaning (a continuation):
    a space after them stops that, and systemd strips it again.
    """
    if value.endswith("\\") and (len(value) - len(value.rstrip("\\"))) % 2:
        return value + " "
    return value


def escape_specifiers(value: str) -> str:
    """VALUE for a setting that expands %-specifiers: it expands back to VALUE."""
    return value.replace("%", "%%")


def format_line(key: str, value: str, entry: Entry | None = None) -> str:
    """One "KEY=VALUE" line (with its newline) that systemd reads back as KEY and VALUE.

    ConfigError (naming ENTRY's file and line) if systemd could not read it in one line.
    """
    line = f"{key}={format_value(value)}"
    if len(line) * 4 >= LINE_MAX and _size(line) >= LINE_MAX:
        raise ConfigError(
            f"too long to write as one line (systemd reads lines of at most "
            f"{LINE_MAX - 1} bytes)",
            entry=entry, key=key,
        )
    return line + "\n"


def read(path: Path, dropins: Iterable[Path] = ()) -> UnitFile:
    """Read PATH and then each drop-in, in the given order."""
    entries: list[Entry] = []
    for p in (path, *dropins):
        try:
            data = read_config(p, UNIT_FILE_MAX)
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=p) from None
        # Bytes, then decode: no text layer (cheaper), and no newline translation
        # either. Bad UTF-8 is an error only outside comments (parse() says where).
        entries.extend(parse(data.decode("utf-8", "surrogateescape"), p))
    return UnitFile(str(path), tuple(entries))
