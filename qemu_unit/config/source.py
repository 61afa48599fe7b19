"""Where VM definitions live: the search path, NAME.vm / NAME.xml, drop-ins.

Import-light (the generator uses it at boot): stdlib, errors and names only.
The rules follow systemd's for unit files: the first directory that has a
file wins, a symlink to /dev/null masks, drop-ins merge by file name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from qemu_unit import paths
from qemu_unit.config.names import check_name, split_template
from qemu_unit.errors import ConfigError
from qemu_unit.paths import SEARCH_PATH
from qemu_unit.records import NamedTuple

# Names for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    Kind = Literal["vm", "xml"]

DEFAULT_PATH: tuple[Path, ...] = SEARCH_PATH
PATH_ENV = "QEMU_RUN_PATH"
SUFFIXES: tuple[Kind, ...] = ("vm", "xml")

# The names in one search directory, read once by Listing. A DirEntry
# knows its file type from the listing itself (d_type), so deciding about a
# thousand VMs costs one scandir() per directory instead of stat() calls per
# VM and directory. None: the directory could not be listed, ask the file system.
_DirEntries = dict[str, os.DirEntry[str]]


class Source(NamedTuple):
    """One VM definition as found on disk.

    For a template instance 'base@inst' read from 'base@.vm', NAME is the
    instance's full name and PATH the template file.
    """

    name: str
    kind: Kind
    path: Path
    dropins: tuple[Path, ...] = ()


class MaskedError(ConfigError):
    """The VM is masked (a /dev/null link): an error to run, silently absent from lists."""


def search_path(
    path: Sequence[str | os.PathLike[str]] | None = None, *, user: bool = False
) -> tuple[Path, ...]:
    """PATH if given, else $QEMU_RUN_PATH (colon-separated), else DEFAULT_PATH (USER:
    the user's own directories, see rootless.py)."""
    if path is not None:
        return tuple(Path(p) for p in path)
    env = os.environ.get(PATH_ENV)
    if env:
        return tuple(Path(p) for p in env.split(":") if p)
    if user:
        return paths.user_search_path()
    return DEFAULT_PATH


def is_masked(path: Path) -> bool:
    """A symlink to /dev/null (or /dev/null itself) masks, as in systemd."""
    # Only a symlink can point at /dev/null: skip realpath() for plain files (boot time).
    if not os.path.islink(path):
        return os.fspath(path) == os.devnull
    return os.path.realpath(path) == os.devnull


def _format_path(dirs: Iterable[Path]) -> str:
    return ":".join(str(d) for d in dirs)


def _list(d: Path) -> _DirEntries:
    with os.scandir(d) as entries:
        return {entry.name: entry for entry in entries}


def _find_file(
    name: str, dirs: tuple[Path, ...], listings: Sequence[_DirEntries | None] | None = None
) -> tuple[Kind, Path, bool] | None:
    """The first NAME.vm or NAME.xml in DIRS ('.vm' first within one directory), and
    whether it is a mask. Directories and dangling links do not count."""
    for index, d in enumerate(dirs):
        listing = listings[index] if listings is not None else None
        for kind in SUFFIXES:
            filename = f"{name}.{kind}"
            if listing is not None:
                entry = listing.get(filename)
                if entry is None:
                    continue
                if not entry.is_symlink():
                    # Not a link, so not a mask: the type from the listing is the answer.
                    if entry.is_file(follow_symlinks=False):
                        return kind, d / filename, False
                    continue
            candidate = d / filename
            if os.path.lexists(candidate):
                if is_masked(candidate):
                    return kind, candidate, True
                if candidate.is_file():
                    return kind, candidate, False
    return None


def find_dropins(
    names: Sequence[str],
    dirs: tuple[Path, ...],
    listings: Sequence[_DirEntries | None] | None = None,
) -> tuple[Path, ...]:
    """NAME.vm.d/*.conf for each of NAMES in every directory of DIRS.

    Merged by file name: the first directory (and, within one directory, the
    first of NAMES) wins; a /dev/null symlink masks that file name. The result
    is in lexical order of file name, the order systemd applies drop-ins in.
    """
    chosen: dict[str, Path] = {}
    for index, d in enumerate(dirs):
        listing = listings[index] if listings is not None else None
        for name in names:
            if listing is not None and f"{name}.vm.d" not in listing:
                continue  # the usual case: no drop-ins, nothing to ask the file system
            dropin_dir = d / f"{name}.vm.d"
            try:
                children = sorted(dropin_dir.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise ConfigError(f"cannot list drop-ins: {e.strerror}", path=dropin_dir) from None
            for child in children:
                if child.name.endswith(".conf") and child.name not in chosen:
                    if is_masked(child) or child.is_file():
                        chosen[child.name] = child
    return tuple(p for _, p in sorted(chosen.items()) if not is_masked(p))


def _source(
    name: str, dirs: tuple[Path, ...], listings: Sequence[_DirEntries | None] | None = None
) -> Source | None:
    """The Source for valid NAME, None when nothing defines it."""
    split = split_template(name)
    if split is not None and not split[1]:
        raise ConfigError(f"{name!r} is a template: run an instance of it, e.g. {name}NAME")
    found = _find_file(name, dirs, listings)
    # The template's drop-ins apply to every instance, as systemd's foo@.service.d.
    dropin_names = [name]
    if split is not None:
        template = f"{split[0]}@"
        dropin_names.append(template)
        if found is None:
            found = _find_file(template, dirs, listings)
    if found is None:
        return None
    kind, path, masked = found
    if masked:
        raise MaskedError(f"VM {name!r} is masked", path=path)
    return Source(name, kind, path, find_dropins(dropin_names, dirs, listings))


def find_source(name: str, path: Sequence[str | os.PathLike[str]] | None = None) -> Source:
    """Find the definition of VM NAME in the search path, or raise ConfigError."""
    check_name(name)
    dirs = search_path(path)
    source = _source(name, dirs)
    if source is None:
        raise ConfigError(
            f"no {name}.vm or {name}.xml in the search path {_format_path(dirs)}"
        )
    return source


def from_file(path: Path) -> Source:
    """The Source of a NAME.vm or NAME.xml given by its path (drop-ins beside it)."""
    if not path.exists():
        raise ConfigError("no such file", path=path)
    kind: Kind = "xml" if path.suffix == ".xml" else "vm"
    name = check_name(path.name.rsplit(".", 1)[0])
    dropins = find_dropins([name], (path.parent,)) if kind == "vm" else ()
    return Source(name=name, kind=kind, path=path, dropins=dropins)


class Listing:
    """The VMs visible in the search path: each directory listed once, NAMES
    sorted; sources() finds the definitions of any share of them (the
    generator's workers each take one).

    A file whose name is not a valid VM name is reported in ERRORS when given,
    so that one bad file does not hide the others.
    """

    def __init__(
        self,
        path: Sequence[str | os.PathLike[str]] | None = None,
        *,
        errors: list[ConfigError] | None = None,
    ) -> None:
        self.dirs = search_path(path)
        self._listings: list[_DirEntries | None] = []
        names: dict[str, None] = {}
        for d in self.dirs:
            try:
                listing = _list(d)
            except (FileNotFoundError, NotADirectoryError):
                self._listings.append({})  # nothing there
                continue
            except OSError as e:
                if errors is not None:
                    errors.append(ConfigError(f"cannot list: {e.strerror}", path=d))
                self._listings.append(None)  # still searchable, perhaps (mode 0711)
                continue
            self._listings.append(listing)
            for filename in sorted(listing):
                stem, dot, suffix = filename.rpartition(".")
                if not dot or suffix not in SUFFIXES or stem.endswith("@"):
                    continue
                entry = listing[filename]
                if entry.is_symlink():
                    child = d / filename
                    if child.is_dir() and not is_masked(child):
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    check_name(stem)
                except ConfigError as e:
                    if errors is not None:
                        errors.append(ConfigError(e.message, path=d / filename))
                    continue
                names.setdefault(stem)
        self.names = sorted(names)

    def find(self, name: str) -> Source | None:
        """The Source of NAME (None: nothing defines it); MaskedError when it is masked,
        ConfigError for any other problem."""
        return _source(name, self.dirs, self._listings)

    def sources(
        self, names: Iterable[str], *, errors: list[ConfigError] | None = None
    ) -> list[Source]:
        """The Sources of NAMES, in order; masked VMs are left out silently, any
        other problem is reported in ERRORS."""
        sources = []
        for name in names:
            try:
                source = self.find(name)
            except MaskedError:
                continue
            except ConfigError as e:
                if errors is not None:
                    errors.append(e)
                continue
            if source is not None:
                sources.append(source)
        return sources


def list_sources(
    path: Sequence[str | os.PathLike[str]] | None = None,
    *,
    errors: list[ConfigError] | None = None,
) -> list[Source]:
    """Every VM visible in the search path, sorted by name (the first directory wins).

    Masked VMs and templates ('base@.vm', which need an instance) are left
    out. A file whose name is not a valid VM name is reported in ERRORS when
    given, so that one bad file does not hide the others.
    """
    listing = Listing(path, errors=errors)
    return listing.sources(listing.names, errors=errors)
