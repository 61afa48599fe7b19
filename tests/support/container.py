"""A real systemd to test under: systemd-nspawn -b over an overlay of the host root.

systemd is not PID 1 on the machines this project is tested on, so system tests
boot one in a container. The host root is the overlay's lower layer (read-only
in effect); every write lands in a tmpfs upper layer that disappears with the
container. Commands run inside through `nsenter -t LEADER -a`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

BASE_DIR = Path("/var/tmp/qemu-unit-tests")
# A clean environment inside: nothing of pytest's or the pyenv shell's leaks in.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
}
# Enabled on the host image, slow and irrelevant in a test container.
MASKED_UNITS = ("postgresql.service", "postgresql@.service")


class ContainerError(Exception):
    pass


# Containers booted and not yet torn down; conftest adds their journals to failed tests.
LIVE: set[Container] = set()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _pids_in_ns(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_ns(int(entry)) == ns:
            pids.append(int(entry))
    return pids


class Container:
    """`with Container("name", prepare) as ct:` boots systemd; leaving always tears down.

    `prepare(upper)` writes files into the upper layer before boot; files
    written to `ct.upper` while it runs show up inside under the same path.
    """

    def __init__(self, name: str, prepare: Callable[[Path], None] | None = None,
                 boot_timeout: float = 60, nspawn_args: Sequence[str] = (),
                 stop_timeout: float = 10) -> None:
        self.name = name
        self.stop_timeout = stop_timeout  # for an orderly shutdown before SIGKILL
        self._nspawn_args = tuple(nspawn_args)  # e.g. "--bind=/dev/kvm": no devices by default
        self._prepare = prepare
        self._boot_timeout = boot_timeout
        self.dir = Path()
        self.upper = Path()
        self.root = Path()
        self.log = Path()
        self.leader = 0
        self._ns: str | None = None
        self._ns_fd: int | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self._setup()
            self._boot()
        except BaseException:
            self._teardown()
            raise
        LIVE.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and self.leader and self.running():
            # The journal goes with the container: keep it in the test's output.
            print(f"--- journal of container {self.name} ---\n{self.dump_journal()}",
                  file=sys.stderr)
        self._teardown()

    def _setup(self) -> None:
        BASE_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(BASE_DIR, 0o755)
        self.dir = Path(tempfile.mkdtemp(prefix=f"ct-{self.name}-", dir=BASE_DIR))
        layers = self.dir / "layers"
        self.root = self.dir / "root"
        self.log = self.dir / "nspawn.log"
        layers.mkdir()
        self.root.mkdir()
        _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(layers))
        self.upper = layers / "upper"
        work = layers / "work"
        self.upper.mkdir(mode=0o755)
        work.mkdir()
        units = self.upper / "etc/systemd/system"
        units.mkdir(parents=True)
        for unit in MASKED_UNITS:
            (units / unit).symlink_to("/dev/null")
        if self._prepare is not None:
            self._prepare(self.upper)
        _mount("-t", "overlay", "overlay", "-o",
               f"lowerdir=/,upperdir={self.upper},workdir={work}", str(self.root))

    def _boot(self) -> None:
        start = time.monotonic()
        with open(self.log, "wb") as log:
            self._nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit",
                 "-M", self.name, "--console=pipe", *self._nspawn_args, "-b"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**INSIDE_ENV, "SYSTEMD_LOG_LEVEL": "info"},
            )
        deadline = start + self._boot_timeout
        state = "no leader yet"
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited ({self._nspawn.returncode}) "
                                     f"during boot:\n{self._log_tail()}")
            if not self.leader:
                self.leader = self._find_leader()
                if self.leader:
                    # Holding the namespace open keeps its inode number from being
                    # reused by another container while we still kill by it.
                    self._ns_fd = os.open(f"/proc/{self.leader}/ns/pid", os.O_RDONLY)
                    self._ns = _pid_ns(self.leader)
            if self.leader:
                proc = self.run("systemctl", "is-system-running", check=False, timeout=10)
                state = proc.stdout.strip() or proc.stderr.strip()
                if state in ("running", "degraded"):
                    break
            time.sleep(0.1)
        else:
            raise ContainerError(f"container {self.name} not up after {self._boot_timeout} s "
                                 f"(state: {state}):\n{self._log_tail()}")
        self.boot_seconds = time.monotonic() - start
        if state == "degraded":
            failed = self.systemctl("--failed", "--no-legend", check=False).stdout
            print(f"container {self.name} is degraded; failed units:\n{failed}",
                  file=sys.stderr)

    def _find_leader(self) -> int:
        """The container's PID 1: the child of systemd-nspawn once it runs systemd."""
        assert self._nspawn is not None
        pid = self._nspawn.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return 0
        for child in children:
            try:
                exe = os.readlink(f"/proc/{child}/exe")
            except OSError:
                continue
            if exe.endswith("/systemd"):
                return int(child)
        return 0

    def running(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is None

    def poweroff(self, timeout: float = 30) -> int:
        """Shut the container down from inside; return systemd-nspawn's exit status."""
        assert self._nspawn is not None
        self.run("systemctl", "poweroff", check=False, timeout=timeout)
        try:
            return self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise ContainerError(f"container {self.name} still up {timeout} s after "
                                 f"poweroff:\n{self._log_tail()}") from e

    def reboot(self, timeout: float = 60) -> None:
        """Power the container off from inside and boot it again on the same file system
        (the overlay's upper layer keeps everything written so far)."""
        status = self.poweroff(timeout)
        if status != 0:
            raise ContainerError(f"container {self.name}: poweroff exited {status}:\n"
                                 f"{self._log_tail()}")
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None
        self.leader, self._ns = 0, None
        self._boot()

    def _teardown(self) -> None:
        LIVE.discard(self)
        if self._nspawn is not None and self._nspawn.poll() is None:
            # SIGTERM asks nspawn for an orderly shutdown of the container.
            self._nspawn.terminate()
            try:
                self._nspawn.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait()
        # Whatever is left in the container's PID namespace (QEMU, stray commands) goes too.
        if self._ns is not None:
            deadline = time.monotonic() + 10
            while (pids := _pids_in_ns(self._ns)) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None
        if self.dir != Path():
            for target in reversed(_mounts_under(self.dir)):
                if subprocess.run(["umount", target], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", target], check=False)
            left = _mounts_under(self.dir)
            if left:
                raise ContainerError(f"still mounted after teardown: {left}")
            shutil.rmtree(self.dir)

    # -- inside -----------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run CMD inside the container (clean environment plus ENV)."""
        if not self.leader:
            raise ContainerError(f"container {self.name} is not running")
        assignments = [f"{k}={v}" for k, v in {**INSIDE_ENV, **(env or {})}.items()]
        full = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *assignments, *cmd]
        proc = subprocess.run(full, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False, env=INSIDE_ENV)
        if check and proc.returncode != 0:
            raise ContainerError(f"in container {self.name}: {' '.join(cmd)} exited "
                                 f"{proc.returncode}\nstdout:\n{proc.stdout}\n"
                                 f"stderr:\n{proc.stderr}")
        return proc

    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def journal(self, *args: str) -> str:
        """journalctl inside, e.g. `journal("-u", "qemu-run@web", "-o", "cat")`."""
        return self.run("journalctl", "--no-pager", *args, check=False).stdout

    def wait_journal(self, text: str, *args: str, timeout: float = 30) -> str:
        """Poll `journalctl ARGS` until its output contains TEXT; return that output."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.journal(*args)
            if text in out:
                return out
            if time.monotonic() > deadline:
                tail = "\n".join(out.splitlines()[-30:])
                raise ContainerError(f"{text!r} not in `journalctl {' '.join(args)}` after "
                                     f"{timeout} s; it ends with:\n{tail}")
            time.sleep(0.2)

    def dump_journal(self, lines: int = 300) -> str:
        """The end of the whole boot's journal, for the output of a failed test."""
        try:
            return self.journal("-b", "-o", "short-monotonic", "-n", str(lines))
        except (ContainerError, subprocess.TimeoutExpired) as e:
            return f"(journal unreadable: {e})"

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no nspawn log)"
        return "\n".join(text.splitlines()[-lines:])


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ContainerError(f"mount {' '.join(args)}: {proc.stderr.strip()}")
