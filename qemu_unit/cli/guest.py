"""`qemu-unit exec` and `qemu-unit cp`: into a running guest through its agent.

Both go through the VM's runner (cli/control.py -> vm/guest.py), which owns the
only libvirt connection to the domain and so to the agent channel.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qemu_unit.cli import control
from qemu_unit.cli.control import ControlFailed

CHUNK = 1024 * 1024  # bytes per line sent to the runner (a line is at most 2 MiB)
# Bytes per line of cp's data to the runner (which writes them in agent.WRITE_CHUNK pieces).
PUSH_CHUNK = 256 * 1024


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def exec_(name: str, argv: list[str], *, env: list[str] | None = None,
          user: str | None = None, timeout: float | None = None,
          stdin: int | None = 0, stdout: int = 1, stderr: int = 2) -> int:
    """Run ARGV in VM NAME's guest; its exit status (a signal N: 128+N). STDIN is sent
    to the program unless it is None or a terminal."""
    send_stdin = stdin is not None and not os.isatty(stdin)
    request: dict[str, Any] = {"op": "exec", "argv": argv, "env": env or [],
                               "user": user, "timeout": timeout, "stdin": send_stdin}

    def output(line: dict[str, Any]) -> None:
        for key, fd in (("stdout", stdout), ("stderr", stderr)):
            if key in line:
                try:
                    _write_all(fd, base64.b64decode(line[key], validate=True))
                except ValueError:
                    raise ControlFailed("the runner sent output that does not decode",
                                        "protocol") from None

    with control.session(name) as s:
        s.send(request)
        if send_stdin:
            assert stdin is not None
            while data := os.read(stdin, CHUNK):
                s.send({"data": base64.b64encode(data).decode()})
            s.send({"eof": True})
        final = s.finish(output)
    if final.get("signal") is not None:
        return 128 + int(final["signal"])
    return int(final.get("exitcode", 255))


# -- cp -------------------------------------------------------------------------------------

_GUEST = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.@+-]*):(/.*)$")


@dataclass(frozen=True)
class Where:
    """One side of cp: a guest path (vm set) or a local one."""

    path: str
    vm: str | None = None

    @classmethod
    def parse(cls, text: str) -> Where:
        m = _GUEST.match(text)
        return cls(m.group(2), m.group(1)) if m else cls(text)

    def __str__(self) -> str:
        return f"{self.vm}:{self.path}" if self.vm else self.path


def cp(src_text: str, dest_text: str, *, recursive: bool = False, progress: bool | None = None
       ) -> int:
    """Copy between this host and a guest; one side is NAME:/PATH."""
    src, dest = Where.parse(src_text), Where.parse(dest_text)
    if (src.vm is None) == (dest.vm is None):
        raise ControlFailed("cp: exactly one of SRC and DEST must be NAME:/PATH (a guest path "
                            "is absolute)", "usage")
    bar = Progress(sys.stderr.isatty() if progress is None else progress)
    try:
        if dest.vm is not None:
            _push(Path(src.path), dest.vm, dest.path, recursive, bar)
        else:
            assert src.vm is not None
            _pull(src.vm, src.path, Path(dest.path), recursive, bar)
    finally:
        bar.close()
    return 0


class Progress:
    """A tqdm bar on a terminal (Debian's python3-tqdm), nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, what: str, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=what[-40:], file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _guest_stat(vm: str, path: str) -> dict[str, Any]:
    return control.call(vm, {"op": "stat", "path": path})


def _push(src: Path, vm: str, dest: str, recursive: bool, bar: Progress) -> None:
    try:
        st = src.stat()
    except FileNotFoundError:
        raise ControlFailed(f"{src}: no such file or directory", "missing") from None
    target = _guest_stat(vm, dest)
    if target.get("type") == "directory":
        dest = f"{dest.rstrip('/')}/{src.resolve().name}"
    elif dest.endswith("/"):
        raise ControlFailed(f"{vm}:{dest}: no such directory in the guest", "missing")
    if stat.S_ISDIR(st.st_mode):
        if not recursive:
            raise ControlFailed(f"{src}: is a directory (use -r)", "usage")
        control.call(vm, {"op": "mkdir", "path": dest, "mode": stat.S_IMODE(st.st_mode)})
        for entry in sorted(src.iterdir()):
            _push_tree(entry, vm, f"{dest}/{entry.name}", bar)
        return
    _push_file(src, vm, dest, st, bar)


def _push_tree(src: Path, vm: str, dest: str, bar: Progress) -> None:
    st = src.lstat()
    if stat.S_ISDIR(st.st_mode):
        control.call(vm, {"op": "mkdir", "path": dest, "mode": stat.S_IMODE(st.st_mode)})
        for entry in sorted(src.iterdir()):
            _push_tree(entry, vm, f"{dest}/{entry.name}", bar)
    elif stat.S_ISREG(st.st_mode):
        _push_file(src, vm, dest, st, bar)
    else:
        print(f"qemu-unit: cp: skipped {src}: not a regular file or directory", file=sys.stderr)


def _push_file(src: Path, vm: str, dest: str, st: os.stat_result, bar: Progress) -> None:
    bar.start(src.name, st.st_size)
    with open(src, "rb") as f, control.session(vm) as s:
        s.send({"op": "push", "path": dest, "mode": stat.S_IMODE(st.st_mode)})
        for data in iter(lambda: f.read(PUSH_CHUNK), b""):
            s.send({"data": base64.b64encode(data).decode()})
            bar.update(len(data))
        s.send({"end": True})
        s.finish()


def _pull(vm: str, src: str, dest: Path, recursive: bool, bar: Progress) -> None:
    found = _guest_stat(vm, src)
    if not found.get("exists"):
        raise ControlFailed(f"{vm}:{src}: no such file or directory in the guest", "missing")
    if dest.is_dir():
        dest = dest / (src.rstrip("/").rsplit("/", 1)[-1] or "root")
    if found.get("type") != "directory":
        _pull_file(vm, src, dest, int(found.get("size", 0)), bar)
        return
    if not recursive:
        raise ControlFailed(f"{vm}:{src}: is a directory in the guest (use -r)", "usage")
    entries = control.call(vm, {"op": "list", "path": src})["entries"]
    dest.mkdir(exist_ok=True)
    dirs = [(dest, int(found.get("mode", 0o755)))]
    for kind, mode, rel in entries:
        target = dest / rel
        if kind == "d":
            target.mkdir(exist_ok=True)
            dirs.append((target, mode))
        elif kind == "f":
            _pull_file(vm, f"{src.rstrip('/')}/{rel}", target, 0, bar)
        else:
            print(f"qemu-unit: cp: skipped {vm}:{src}/{rel}: not a regular file or directory",
                  file=sys.stderr)
    for d, mode in reversed(dirs):  # after their contents: a read-only directory last
        d.chmod(mode)


def _pull_file(vm: str, src: str, dest: Path, size: int, bar: Progress) -> None:
    bar.start(dest.name, size)
    with _temporary(dest) as f:
        def data(line: dict[str, Any]) -> None:
            try:
                chunk = base64.b64decode(line.get("data", ""), validate=True)
            except ValueError:
                raise ControlFailed("the runner sent data that does not decode",
                                    "protocol") from None
            f.write(chunk)
            bar.update(len(chunk))

        final = control.call(vm, {"op": "pull", "path": src}, data)
        f.flush()
        os.fchmod(f.fileno(), int(final.get("mode", 0o644)) & 0o7777)


@contextlib.contextmanager
def _temporary(dest: Path) -> Iterator[BinaryIO]:
    """A file next to DEST that becomes DEST when the block ends well, and is gone
    otherwise: a partial copy never has the final name."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or Path("."))
    temp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
