"""`qemu-unit run` outside systemd, against a real NOTIFY_SOCKET, real libvirt and QEMU."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.guest import build_test_guest, cmdline

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
BASE = Path("/var/lib/qemu-unit-tests")


class NotifySocket:
    """The service manager's end of the sd_notify protocol.

    Like PID 1 it reads all the time (a thread): the kernel queues only
    net.unix.max_dgram_qlen (10) datagrams, and a runner whose watchdog pings fill
    an unread queue blocks in sendto().
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.path.chmod(0o777)  # the runner drops to the qemu-run user
        self.messages: list[dict[str, str]] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._arrived:
                self.messages.append(msg)
                self._arrived.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30,
                 prefix: str | None = None) -> dict[str, str]:
        def match() -> dict[str, str] | None:
            for msg in self.messages:
                if key in msg and (value is None or msg[key] == value) and (
                        prefix is None or msg[key].startswith(prefix)):
                    return msg
            return None

        with self._arrived:
            found = self._arrived.wait_for(match, timeout)
            if found is None:
                raise AssertionError(f"no {key}={value or '*'} within {timeout}s: "
                                     f"{self.messages}")
            return found

    def close(self) -> None:
        # shutdown() wakes the reader blocked in recv()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


@pytest.fixture
def workdir() -> Iterator[Path]:
    subprocess.run(["systemd-sysusers", str(REPO / "units/qemu-unit.sysusers")], check=True)
    BASE.mkdir(parents=True, exist_ok=True)
    BASE.chmod(0o755)
    with tempfile.TemporaryDirectory(dir=BASE, prefix="n") as tmp:
        d = Path(tmp)
        d.chmod(0o755)
        yield d


def write_vm(d: Path, name: str, mode: str, extra: str = "") -> None:
    guest = build_test_guest()
    (d / "cfg").mkdir(exist_ok=True)
    (d / "cfg" / f"{name}.vm").write_text(
        "[VM]\nMemory=256M\nAccel=tcg\nMachine=pc\nNetwork=none\n"
        f"Kernel={guest.kernel}\nInitrd={guest.initrd}\nKernelCmdline={cmdline(mode)}\n{extra}"
    )


def _qemus_under(root: Path) -> list[int]:
    """QEMU processes whose command line names ROOT (daemonized: not the runner's children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd.split(b"\0", 1)[0] and str(root).encode() in cmd:
            pids.append(int(entry))
    return pids


# The runtime root (embed root) of each runner started(), by PID.
RUNTIMES: dict[int, Path] = {}


@contextlib.contextmanager
def started(d: Path, name: str, notify: NotifySocket,
            **env: str) -> Iterator[subprocess.Popen[str]]:
    """The runner outside systemd; leaving kills it, its QEMU and its runtime root.

    Outside a unit nothing kills a daemonized QEMU whose runner died (a failed
    assertion, a timeout): this context does, so a failing test leaves nothing behind.
    """
    # A short runtime root: the monitor socket path must fit in 108 bytes.
    runtime = Path(tempfile.mkdtemp(prefix="qu", dir="/run"))
    environ = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": str(notify.path),
        "STATE_DIRECTORY": str(d / "state"),
        "RUNTIME_DIRECTORY": str(runtime),
        "CACHE_DIRECTORY": str(BASE / "cache"),
        # As root the runner would make /var/log/qemu-run/NAME: keep the host clean.
        "LOGS_DIRECTORY": str(d / "logs"),
        **env,
    }
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-m", "qemu_unit", "run", "--config-dir", str(d / "cfg"), name],
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
    )
    RUNTIMES[proc.pid] = runtime
    try:
        yield proc
    finally:
        RUNTIMES.pop(proc.pid, None)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        deadline = time.monotonic() + 10
        while (pids := _qemus_under(runtime)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        shutil.rmtree(runtime, ignore_errors=True)
        notify.close()
        assert not _qemus_under(runtime), f"QEMU under {runtime} survived SIGKILL"


def test_notify_protocol_through_a_graceful_stop(workdir: Path) -> None:
    write_vm(workdir, "n1", "wait")
    notify = NotifySocket(workdir)
    with started(workdir, "n1", notify, WATCHDOG_USEC="1000000") as proc:
        notify.wait_for("STATUS", "Starting")
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"].startswith("Running")
        notify.wait_for("WATCHDOG", "1", timeout=5)
        time.sleep(3)  # let the guest reach the point where it listens
        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1")
        assert stopping["STATUS"].startswith("Shutting down")
        extend = notify.wait_for("EXTEND_TIMEOUT_USEC")
        assert int(extend["EXTEND_TIMEOUT_USEC"]) > 60_000_000  # default ShutdownTimeout=60s
        _, err = proc.communicate(timeout=90)
        assert notify.wait_for("STATUS", "Stopped: the guest powered off")
    assert proc.returncode == 0, err
    assert "n1 console: qemu-unit-guest: power button pressed" in err
    # Watchdog pings (every 0.5 s) must not make libvirt log anything.
    assert "warning" not in err, err


def test_second_signal_destroys_at_once(workdir: Path) -> None:
    write_vm(workdir, "n2", "ignore")
    notify = NotifySocket(workdir)
    with started(workdir, "n2", notify) as proc:
        notify.wait_for("READY", "1")
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        notify.wait_for("STOPPING", "1")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGRTMIN + 4)
        notify.wait_for("STATUS", "Destroying", timeout=10)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 15  # far below ShutdownTimeout=60s
    assert proc.returncode == 0, err
    assert "Received SIGRTMIN+4 again: destroying the VM now" in err


def test_control_socket_answers_while_the_vm_runs(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qemu_unit.cli import control

    write_vm(workdir, "n3", "ignore")
    notify = NotifySocket(workdir)
    with started(workdir, "n3", notify) as proc:
        notify.wait_for("READY", "1")
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(RUNTIMES[proc.pid]))
        answer = control.call("n3", {"op": "ping"})
        assert answer == {"ok": True, "name": "n3", "pid": proc.pid, "running": True}
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        # Gone with the runner: a clear "not running", never a hang.
        with pytest.raises(control.ControlFailed) as e:
            control.call("n3", {"op": "ping"})
        assert e.value.exit_status == control.EXIT_NOT_RUNNING
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("name", "vm", "expected"),
    [
        ("nosuch", None, "no nosuch.vm or nosuch.xml"),
        ("typo", "Memroy=1G\n", "typo.vm:9: Memroy=:"),
        ("nodisk", "Disk=/nonexistent/disk.img\n", "Disk=:"),
        ("bad/name", None, "VM name"),
    ],
)
def test_bad_input_exit_78_with_status(
    workdir: Path, name: str, vm: str | None, expected: str
) -> None:
    if vm is not None:
        write_vm(workdir, name, "wait", vm)
    (workdir / "cfg").mkdir(exist_ok=True)
    notify = NotifySocket(workdir)
    with started(workdir, name, notify) as proc:
        _, err = proc.communicate(timeout=30)
        status = notify.wait_for("STATUS", prefix="Failed", timeout=5)
    assert proc.returncode == 78, err
    assert expected in err
    assert expected in status["STATUS"]
    assert err.count("\n") == 1, err  # one clear line


def test_notify_module_uses_the_real_socket(workdir: Path) -> None:
    from qemu_unit.vm.notify import Notifier

    notify = NotifySocket(workdir)
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(notify.path)
    try:
        n = Notifier()
        n.ready("Running (TCG)")
        n.extend_timeout(2.5)
    finally:
        if old is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = old
    assert notify.wait_for("READY", "1")["STATUS"] == "Running (TCG)"
    assert notify.wait_for("EXTEND_TIMEOUT_USEC")["EXTEND_TIMEOUT_USEC"] == "2500000"
    notify.close()


def test_hostile_name_run_as_root_creates_nothing() -> None:
    # As root, `run` creates the system directories before dropping privileges:
    # the name is checked first, so ".." cannot steer where root writes.
    escaped = [Path(p) / "qemu-unit-escape-test" for p in ("/var/lib", "/run", "/var/cache")]
    result = subprocess.run(
        ["/usr/bin/python3", "-m", "qemu_unit", "run", "../qemu-unit-escape-test"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78, result.stderr
    assert "VM name" in result.stderr
    assert [p for p in escaped if p.exists()] == []
