"""The systemd generator: NAME.vm files -> drop-ins and .wants/ links for qemu-run@NAME.service.

Called by systemd at boot and on every daemon-reload as
`qemu-unit-generator NORMAL_DIR [EARLY_DIR LATE_DIR]` (systemd.generator(7)).
Only NORMAL_DIR is written: generated configuration loses against /etc but
wins over the vendor template in /usr.

For each valid VM it writes `qemu-run@NAME.service.d/50-qemu-unit.conf` (the
file's [Unit] and [Service] entries plus what the VM configuration needs from
the template's sandbox) and, from [Install], `TARGET.wants/qemu-run@NAME.service`
and `TARGET.requires/...` symlinks. A bad file is reported with file, line and
key and skipped; every other file is still generated; the exit status is 1 if
anything failed (as Quadlet does).

A template VM (base@.vm) is generated only for instances that have a file of
their own (base@inst.vm, e.g. a symlink to the template, as with Quadlet's
foo@bar.container): no systemd drop-in directory matches "every instance of
base@" inside qemu-run@.service. An instance without its own file runs with the
template's sandbox as is (no network, no files outside the state directory).

Generators run before /var is mounted and must not talk to other processes:
this module imports the standard library and the .vm parser only, never
libvirt, and checks syntax and values only (disks may live on file systems
that are not mounted yet).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qemu_unit import paths
from qemu_unit.config import settings, source
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.generator.convert import (
    FALLBACK_TEMPLATE,
    PROGRAM,
    TEMPLATE,
    USER_FALLBACK_TEMPLATE,
    Generated,
    convert,
    instance_unit,
)

# Names for mypy only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO


# The system manager's unit search path (systemd 252), without the generator,
# .control, .attached and transient directories no installer puts a template in.
UNIT_DIRS = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
)
# The user manager's (systemd 252, without the generator and transient directories);
# ~/.config/systemd/user comes first (unit_search_path()).
USER_UNIT_DIRS = (
    "/etc/systemd/user",
    "/run/systemd/user",
    "/usr/local/lib/systemd/user",
    "/usr/lib/systemd/user",
)
# Below this many VMs per process a fork costs more than it saves (measured: 100
# to 150 VMs break even at ~0.08 ms per VM).
PARALLEL_MIN = 100
MAX_WORKERS = 8

# A /dev/kmsg record is at most ~1 KiB; a longer write fails with EINVAL.
_KMSG_MAX = 1000
# The kernel's default ratelimit for /dev/kmsg writers: 10 records per open file.
_KMSG_BURST = 10
_KMSG_MAX_RECORDS = 200


def unit_search_path(user: bool = False) -> list[str]:
    """The directories systemd loads units from; $SYSTEMD_UNIT_PATH as systemd reads it."""
    defaults = [str(paths.user_config_home() / "systemd/user"), *USER_UNIT_DIRS] if user \
        else list(UNIT_DIRS)
    env = os.environ.get("SYSTEMD_UNIT_PATH")
    if env is None:
        return defaults
    dirs = [d for d in env.split(":") if d]
    # A trailing ":" means "and then the defaults".
    if env.endswith(":"):
        dirs += defaults
    return dirs


class UnitFiles:
    """The qemu-run@ unit files in the search path, each directory listed once.

    One listing per directory instead of a stat() per VM and directory: this
    runs at every boot, possibly for a thousand VMs.
    """

    def __init__(self, dirs: Sequence[str]) -> None:
        self._first: dict[str, str] = {}
        for d in dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name.startswith(paths.UNIT_PREFIX):
                    self._first.setdefault(name, os.path.join(d, name))

    def find(self, name: str) -> str | None:
        """The first DIR/NAME in the search path (a link to /dev/null, a mask, counts)."""
        return self._first.get(name)

    def link_target(self, unit: str, fallback: str = FALLBACK_TEMPLATE) -> str:
        """What `systemctl enable` would link to: the instance's own file, else the template."""
        return self.find(unit) or self.find(TEMPLATE) or fallback


class Log:
    """Messages for the administrator: /dev/kmsg at boot (no syslog yet), else stderr.

    SYSTEMD_LOG_TARGET=console (as systemd's tools read it) forces stderr.
    """

    def __init__(self, *, to_stderr: bool = False, stderr: TextIO | None = None) -> None:
        self._stderr = stderr if stderr is not None else sys.stderr
        self._kmsg: int | None = None
        self._on_fd = 0  # records written through the current /dev/kmsg descriptor
        self._records = 0
        self.errors = 0
        if to_stderr or os.environ.get("SYSTEMD_LOG_TARGET") == "console":
            return
        self._kmsg = self._open_kmsg()

    @staticmethod
    def _open_kmsg() -> int | None:
        try:
            # O_APPEND: meaningless for the device, but a plain file put in its
            # place (tests, containers) keeps every record.
            return os.open("/dev/kmsg", os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None

    def close(self) -> None:
        if self._kmsg is not None:
            os.close(self._kmsg)
            self._kmsg = None

    def after_fork(self) -> None:
        """In a forked worker: a descriptor of its own, so the kernel's per-file
        ratelimit is not shared with the parent."""
        if self._kmsg is not None:
            self.close()
            self._kmsg = self._open_kmsg()
            self._on_fd = 0

    def error(self, message: str) -> None:
        self.errors += 1
        self._emit(3, message)

    def warning(self, message: str) -> None:
        self._emit(4, message)

    def _emit(self, level: int, message: str) -> None:
        message = message.replace("\n", " ")
        if self._kmsg is not None and self._write_kmsg(level, message):
            return
        self._stderr.write(f"{PROGRAM}: {message}\n")
        self._stderr.flush()

    def _write_kmsg(self, level: int, message: str) -> bool:
        """Write one record; False if /dev/kmsg refused it (then stderr gets it)."""
        assert self._kmsg is not None
        self._records += 1
        if self._records > _KMSG_MAX_RECORDS:
            return True  # said once below; the rest would only flood the kernel log
        if self._records == _KMSG_MAX_RECORDS:
            level, message = 4, "too many messages; the rest are not logged"
        if self._on_fd == _KMSG_BURST:
            # The kernel drops all but 10 records per open file in 5 s
            # (printk_devkmsg=ratelimit): one broken file must not hide the 11th.
            self.close()
            self._kmsg = self._open_kmsg()
            self._on_fd = 0
            if self._kmsg is None:
                return False
        record = f"<{level}>{PROGRAM}[{os.getpid()}]: {message}".encode(errors="replace")
        try:
            # One write() is one kernel log record.
            os.write(self._kmsg, record[:_KMSG_MAX] + b"\n")
        except OSError:
            return False
        self._on_fd += 1
        return True


class Writer:
    """Creates generated files under OUTDIR.

    systemd hands generators empty directories, so files are written in place;
    a rerun by hand into a used directory replaces what is there.
    """

    def __init__(self, outdir: Path) -> None:
        self._root = str(outdir)
        # Directories known to exist: most VMs share TARGET.wants/, and each mkdir()
        # saved is a system call at every boot.
        self._made: set[str] = set()

    def _path(self, rel: str) -> str:
        """OUTDIR/REL, once the directory it goes in exists (plain strings: ~40% less time
        than with pathlib, measured over 1000 VMs)."""
        directory, _, _ = rel.rpartition("/")
        if directory and directory not in self._made:
            os.makedirs(os.path.join(self._root, directory), exist_ok=True)
            self._made.add(directory)
        return os.path.join(self._root, rel)

    def write(self, generated: Generated) -> None:
        for rel, text in generated.files:
            with open(self._path(rel), "w", encoding="utf-8") as f:
                f.write(text)
        for rel, target in generated.symlinks:
            link = self._path(rel)
            try:
                os.symlink(target, link)
            except FileExistsError:
                os.unlink(link)
                os.symlink(target, link)


def render_dryrun(generated: Generated, out: TextIO) -> None:
    for rel, text in generated.files:
        out.write(f"---{rel}---\n{text}\n")
    for rel, link_target in generated.symlinks:
        out.write(f"---{rel} -> {link_target}---\n\n")


USAGE = f"usage: {PROGRAM} NORMAL_DIR [EARLY_DIR LATE_DIR] | {PROGRAM} --dryrun"


def _parse_args(argv: Sequence[str]) -> tuple[bool, Path | None]:
    """(dryrun, NORMAL_DIR); ValueError with a message on bad usage."""
    dryrun = "--dryrun" in argv
    rest = [a for a in argv if a != "--dryrun"]
    options = [a for a in rest if a.startswith("-")]
    if options:
        raise ValueError(f"unknown option {options[0]}")
    if dryrun:
        # Output directories are accepted and left alone, like `quadlet -dryrun`.
        return True, None
    if len(rest) not in (1, 3):
        raise ValueError("expected 1 or 3 output directories")
    return False, Path(rest[0])


class _Failed:
    """What is left of a VM that failed in a step of _generate(): the message."""

    def __init__(self, message: str) -> None:
        self.message = message


def _step(sources: Sequence[source.Source], results: list[Any], step: Callable[..., Any]) -> None:
    """RESULTS[i] = STEP(SOURCES[i], RESULTS[i]) for each VM that has not failed yet."""
    for index, (src, result) in enumerate(zip(sources, results, strict=True)):
        if isinstance(result, _Failed):
            continue
        try:
            results[index] = step(src, result)
        except QemuUnitError as e:
            results[index] = _Failed(f"{e} (skipped)")
        except Exception as e:
            # A bug met in one file must not keep every other VM from booting.
            results[index] = _Failed(
                f"{src.path}: internal error: {type(e).__name__}: {e} (skipped)"
            )


def _generate(
    sources: Sequence[source.Source], unit_files: UnitFiles, writer: Writer | None, log: Log,
    out: TextIO, user: bool = False,
) -> None:
    # Each step over every VM before the next one, not one VM at a time: the same
    # work, but ~25% faster for a thousand VMs (measured), since the system calls
    # and each stretch of Python code then run together. Messages still come in
    # the end, VM by VM, in the same order as one VM at a time would give them.
    def converted(_: source.Source, vm: settings.VMConfig) -> Generated:
        fallback = USER_FALLBACK_TEMPLATE if user else FALLBACK_TEMPLATE
        return convert(vm, template=unit_files.link_target(instance_unit(vm.name), fallback),
                       user=user)

    results: list[Any] = [None] * len(sources)
    _step(sources, results, lambda src, _: settings.read_source(src))
    _step(sources, results, settings.build_vm)
    _step(sources, results, converted)
    for src, generated in zip(sources, results, strict=True):
        if isinstance(generated, _Failed):
            log.error(generated.message)
            continue
        for warning in generated.warnings:
            log.warning(warning)
        if writer is None:
            render_dryrun(generated, out)
            continue
        try:
            writer.write(generated)
        except OSError as e:
            log.error(f"{src.path}: cannot write the generated files: {e}")


def _workers(count: int) -> int:
    """How many processes share COUNT VMs: one per usable CPU, each with enough to do."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS, count // PARALLEL_MIN))


def _in_parallel(
    names: Sequence[str], workers: int, work: Callable[[Sequence[str]], None], log: Log
) -> None:
    """WORK over NAMES split across WORKERS processes (forked: imports are already paid).

    The generator delays the boot: with a thousand VMs, parsing dominates and
    the other cores would idle. Each child logs its own errors; its exit status
    says whether there were any.
    """
    children = []
    for index in range(1, workers):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                log.after_fork()
                errors = log.errors
                work(names[index::workers])
                status = 1 if log.errors > errors else 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                # Skip atexit handlers and buffered output inherited from the parent.
                os._exit(status)
        children.append(pid)
    try:
        work(names[0::workers])
    finally:
        for pid in children:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                log.errors += 1


def run(outdir: Path | None, log: Log, out: TextIO, user: bool = False) -> int:
    """Generate for every VM in the search path into OUTDIR (None: print to OUT).
    USER: a user's VMs for the user's manager (config/rootless.py).

    Returns 1 if any file failed, else 0.
    """
    problems: list[ConfigError] = []
    listing = source.Listing(source.search_path(user=user), errors=problems)
    for problem in problems:
        log.error(f"{problem} (skipped)")
    unit_files = UnitFiles(unit_search_path(user))
    writer = Writer(outdir) if outdir is not None else None

    def work(names: Sequence[str]) -> None:
        # Each process finds its own share's files: the same messages, in the
        # same order as list_sources() gives them, and less to do before forking.
        missing: list[ConfigError] = []
        sources = listing.sources(names, errors=missing)
        for problem in missing:
            log.error(f"{problem} (skipped)")
        _generate(sources, unit_files, writer, log, out, user)

    # --dryrun prints in order: one process.
    workers = _workers(len(listing.names)) if writer is not None else 1
    _in_parallel(listing.names, workers, work, log)
    return 1 if log.errors else 0


def main(argv: Sequence[str] | None = None, user: bool | None = None) -> int:
    """USER: a user manager's generator; None: as $SYSTEMD_SCOPE says (systemd sets it)."""
    if user is None:
        user = os.environ.get("SYSTEMD_SCOPE") == "user"
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(USAGE)
        return 0
    try:
        dryrun, outdir = _parse_args(args)
    except ValueError as e:
        print(f"{PROGRAM}: {e}\n{USAGE}", file=sys.stderr)
        return 2
    log = Log(to_stderr=dryrun)
    # One run and the process exits. Reference counting frees what it drops
    # (no cycles to speak of): collections would only cost time, and dirty
    # pages that forked workers share.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return run(outdir, log, sys.stdout, user)
    except QemuUnitError as e:
        log.error(str(e))
        return 1
    finally:
        log.close()
        # All that is alive now lives until exit: frozen, it is left alone by
        # the collection at interpreter exit (~4 ms at every boot).
        gc.freeze()
        if collecting:
            gc.enable()


if __name__ == "__main__":
    sys.exit(main())
