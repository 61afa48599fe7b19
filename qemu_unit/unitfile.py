"""systemd unit-file syntax, and nothing else: no keys, no libvirt.

Sections, comments, continuation lines, repeated keys and drop-ins, each value
remembered with the file and line it came from so that later stages can say
exactly where a bad value was written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qemu_unit.errors import ConfigError

_SECTION = re.compile(r"\[([^\[\]]+)\]")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")
# systemd's WHITESPACE and line ends: str.strip() and str.splitlines() would also
# take form feeds, U+0085, U+2028 and friends, shifting line numbers and values.
_WHITESPACE = " \t\n\r"
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Entry:
    section: str
    key: str
    value: str
    path: str
    line: int


@dataclass(frozen=True)
class UnitFile:
    """The entries of a file and its drop-ins, in the order they were read."""

    path: str
    entries: tuple[Entry, ...]

    def sections(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.entries:
            seen.setdefault(e.section)
        return list(seen)

    def section(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.section == name]

    def lookup(self, section: str, key: str) -> list[Entry]:
        """Every assignment of KEY in SECTION, earliest first (repeats kept)."""
        return [e for e in self.entries if e.section == section and e.key == key]


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Join continuation lines; yield (first line number, joined line)."""
    start = 0
    parts: list[str] = []
    for number, raw in enumerate(_LINE_END.split(text), 1):
        line = raw.strip(_WHITESPACE)
        if parts and line[:1] in ("#", ";"):
            # systemd ignores comment lines inside a continuation.
            continue
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].rstrip(_WHITESPACE))
            continue
        parts.append(line)
        yield start, " ".join(parts).strip(_WHITESPACE)
        parts = []
    if parts:
        yield start, " ".join(parts).strip(_WHITESPACE)


def parse(text: str, path: str | Path) -> list[Entry]:
    """Parse unit-file TEXT read from PATH (used in messages only)."""
    path = str(path)
    if "\0" in text:
        raise ConfigError("file contains a NUL byte", path=path)
    section: str | None = None
    entries: list[Entry] = []
    for number, line in _logical_lines(text):
        if not line or line[0] in ("#", ";"):
            continue
        if line.startswith("["):
            match = _SECTION.fullmatch(line)
            if not match:
                raise ConfigError(f"invalid section header {line!r}", path=path, line=number)
            section = match.group(1)
            continue
        key, sep, value = line.partition("=")
        key = key.strip(_WHITESPACE)
        if not sep:
            raise ConfigError(
                f"expected KEY=VALUE, got {line!r}", path=path, line=number
            )
        if not _KEY.fullmatch(key):
            raise ConfigError(f"invalid key name {key!r}", path=path, line=number)
        if section is None:
            raise ConfigError(
                "assignment outside of any section", path=path, line=number, key=key
            )
        entries.append(Entry(section, key, value.strip(_WHITESPACE), path, number))
    return entries


def read(path: Path, dropins: Iterable[Path] = ()) -> UnitFile:
    """Read PATH and then each drop-in, in the given order."""
    entries: list[Entry] = []
    for p in (path, *dropins):
        try:
            # utf-8-sig: systemd skips a byte order mark at the start of a file.
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not valid UTF-8: {e.reason}", path=p) from None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=p) from None
        entries.extend(parse(text, p))
    return UnitFile(str(path), tuple(entries))
