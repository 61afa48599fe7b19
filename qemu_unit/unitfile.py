"""systemd unit-file syntax, and nothing else: no keys, no libvirt.

Sections, comments, continuation lines, repeated keys and drop-ins, each value
remembered with the file and line it came from so that later stages can say
exactly where a bad value was written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qemu_unit.errors import ConfigError

# The characters of a key name, for str.strip(): a key is valid when nothing is
# left. No regular expressions here: this runs for every line of every file at boot.
_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
# systemd's WHITESPACE and line ends: str.strip() and str.splitlines() would also
# take form feeds, U+0085, U+2028 and friends, shifting line numbers and values.
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class Entry:
    """One KEY=VALUE assignment, with the section, file and line it was read in."""

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


def _split_lines(text: str) -> list[str]:
    """TEXT split at "\\r\\n", "\\r" and "\\n", and at nothing else."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, line) for each line, continuation lines joined."""
    lines = [raw.strip(_WHITESPACE) for raw in _split_lines(text)]
    if "\\" not in text:
        # No continuation anywhere (nearly every file): each line stands alone.
        return enumerate(lines, 1)
    return _join_continuations(lines)


def _join_continuations(lines: list[str]) -> Iterator[tuple[int, str]]:
    start = 0
    parts: list[str] = []
    for number, line in enumerate(lines, 1):
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
        # Lines come stripped: only the right end of a key and the left end of
        # a value can hold whitespace.
        if not line or line[0] in ("#", ";"):
            continue
        if line[0] == "[":
            name = line[1:-1]
            if line[-1] != "]" or not name or "[" in name or "]" in name:
                raise ConfigError(f"invalid section header {line!r}", path=path, line=number)
            section = name
            continue
        key, sep, value = line.partition("=")
        key = key.rstrip(_WHITESPACE)
        if not sep:
            raise ConfigError(
                f"expected KEY=VALUE, got {line!r}", path=path, line=number
            )
        if not key or key.strip(_KEY_CHARS):
            raise ConfigError(f"invalid key name {key!r}", path=path, line=number)
        if section is None:
            raise ConfigError(
                "assignment outside of any section", path=path, line=number, key=key
            )
        entries.append(Entry(section, key, value.lstrip(_WHITESPACE), path, number))
    return entries


def _read_bytes(path: Path) -> bytes:
    """PATH's contents through plain os calls: four system calls, where
    Path.read_bytes() makes nine and two file objects (a thousand VMs at boot)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read(path: Path, dropins: Iterable[Path] = ()) -> UnitFile:
    """Read PATH and then each drop-in, in the given order."""
    entries: list[Entry] = []
    for p in (path, *dropins):
        try:
            # utf-8-sig: systemd skips a byte order mark at the start of a file.
            # Bytes, then decode: no text layer (cheaper), and no newline
            # translation either, which _split_lines() does the same way.
            text = _read_bytes(p).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not valid UTF-8: {e.reason}", path=p) from None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=p) from None
        entries.extend(parse(text, p))
    return UnitFile(str(path), tuple(entries))
