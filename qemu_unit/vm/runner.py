"""`qemu-unit run NAME`: one VM in the foreground, through libvirt's embedded driver.

`run()` walks the pipeline once (docs/DESIGN.md): source.find_source (the one check
of NAME), becoming the service user when root starts it by hand, settings.load_vm,
host.plan (where bad input fails, before anything is acquired), domain.render (the
string createXML gets). `Runner` then only acquires and supervises: it holds the VM in
`running_domain()`, whose exit path is always: graceful shutdown, bounded wait,
destroy. Signals, libvirt lifecycle events and console matches all arrive on one
queue, so the main loop is the only place that decides anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import queue
import re
import signal
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from qemu_unit import log, paths, startup
from qemu_unit.config import domainxml, rootless, settings, source
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.paths import SERVICE_USER, UUID_FILE, Dirs
from qemu_unit.vm import (
    caps,
    control,
    domain,
    host,
    saved,
)
from qemu_unit.vm.console import Console, Policy
from qemu_unit.vm.events import (
    DiskError,
    Event,
    GuestReady,
    HealthChecked,
    Lifecycle,
    Rebooted,
    SaveRequested,
    Signalled,
    StopRequested,
    Tick,
)
from qemu_unit.vm.notify import Notifier

if TYPE_CHECKING:
    from qemu_unit.vm import health, status

logger = log.log
# Imported while createXML runs (it releases the GIL and QEMU starts on the other core):
# what the runner needs right after it, not before: status and json (~3 ms), tempfile
# (status.write's, with shutil ~3.5 ms, else paid between createXML and READY=1), systemd.journal
# (log.setup's journal handler, made at the first record, ~4 ms); and where the VM needs
# them, health (HealthCmd=) and backup (checkpoints to give back). The modules of the
# control ops load at their first request (control.OWNERS).
LATE_MODULES = ("qemu_unit.vm.status", "json", "tempfile", "systemd.journal")
BACKUP_MODULE = "qemu_unit.vm.backup"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGRTMIN + 4)
# A guest still booting misses a power-button press; pressing again is harmless.
SHUTDOWN_RETRY = 5.0
# QEMU pauses a guest whose disk write hit ENOSPC (werror=enospc); nobody but the
# runner can resume an embedded domain, so it tries again at this pace.
RESUME_RETRY = 5.0
# A busy host (TCG guests on few cores) keeps monitor answers waiting for seconds: with
# a short WatchdogSec= half a period alone took a healthy QEMU for a hung one.
HANG_FLOOR = 5.0
# How often Ready=agent asks the guest agent while the guest boots.
AGENT_POLL = 0.5
# How long after a restore the runner tries to have the guest agent set the guest clock.
CLOCK_SYNC_WINDOW = 120.0
QEMU_CONF = """\
# Written by qemu-unit at every start; edits are lost.
stdio_handler = "file"
"""


# -- libvirt --------------------------------------------------------------------------------


def late_modules(vm: settings.VMConfig, dirs: Dirs) -> tuple[str, ...]:
    """What VM's runner imports while createXML runs (LATE_MODULES)."""
    extra: tuple[str, ...] = ("qemu_unit.vm.health",) if vm.health_cmd is not None else ()
    if paths.checkpoints_dir(dirs.state).is_dir():
        extra += (BACKUP_MODULE,)
    return LATE_MODULES + extra


def load_late_modules(modules: tuple[str, ...] = LATE_MODULES) -> None:
    for module in modules:
        importlib.import_module(module)


_loop_started = False


def start_event_loop() -> None:
    """The embed driver needs an event loop registered before the connection opens."""
    global _loop_started
    if _loop_started:
        return
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _loop_started = True


@contextlib.contextmanager
def locked_root(root: Path) -> Iterator[None]:
    """One runner per embed root; say so clearly instead of libvirt's pid-file error."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / paths.LOCK_FILE,
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ConfigError(
                f"embed root is in use by another runner (pid {holder or '?'})", path=root
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def prepare_root(dirs: Dirs) -> None:
    for d in (dirs.state, dirs.cache, dirs.logs):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = dirs.root / paths.QEMU_CONF
    conf.parent.mkdir(exist_ok=True, mode=0o700)
    conf.write_text(QEMU_CONF)
    (dirs.state / "lib").mkdir(exist_ok=True, mode=0o700)
    for link, target in (("cache", dirs.cache), ("lib", dirs.state / "lib")):
        path = dirs.root / link
        if path.is_symlink() and path.readlink() == target:
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            raise QemuUnitError(f"{path} is a directory; expected a link to {target}")
        path.symlink_to(target)
    # Unprivileged libvirt writes below $HOME and XDG dirs; keep all of it in our dirs.
    os.environ["HOME"] = os.fspath(dirs.state)
    os.environ["XDG_CACHE_HOME"] = os.fspath(dirs.root / "xdg-cache")
    os.environ["XDG_CONFIG_HOME"] = os.fspath(dirs.root / "xdg-config")
    os.environ["XDG_RUNTIME_DIR"] = os.fspath(dirs.root)


@contextlib.contextmanager
def probe_lock(cache: Path) -> Iterator[None]:
    """Serialize the first start on a cold capability cache, so the probe runs once per host."""
    caps = paths.capabilities_dir(cache)

    def warm() -> bool:
        return caps.is_dir() and any(caps.glob("*.xml"))

    if warm():
        yield
        return
    fd = os.open(cache / paths.PROBE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if warm():
            # Another VM probed while we waited: no need to hold everyone else up.
            os.close(fd)
            fd = -1
        else:
            logger.info("QEMU capability cache is cold: probing (other VMs starting now wait)")
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _libvirt_message(e: libvirt.libvirtError) -> str:
    return str(e.get_error_message() or e)


def _is_config_error(e: libvirt.libvirtError) -> bool:
    return e.get_error_code() in (
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_XML_DETAIL,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_INVALID_ARG,
    )


class MonitorProbe:
    """Asks QEMU's monitor a trivial question from a thread of its own.

    libvirt answers dom.state() from its own bookkeeping, so a hung QEMU goes
    unnoticed there. ioThreadInfo() is a real QMP round trip (query-iothreads)
    that does not taint the domain, unlike qemuMonitorCommand; it blocks for as
    long as QEMU does not answer, hence the thread.
    """

    def __init__(self, dom: libvirt.virDomain) -> None:
        self._dom = dom
        self._ask = threading.Event()
        self._asked_at: float | None = None  # None: nothing unanswered
        threading.Thread(target=self._run, name="monitor-probe", daemon=True).start()

    def ask(self) -> None:
        """Ask again unless the last question is still unanswered."""
        if self._asked_at is None:
            self._asked_at = time.monotonic()
            self._ask.set()

    def unanswered_for(self) -> float:
        asked = self._asked_at
        return 0.0 if asked is None else time.monotonic() - asked

    @staticmethod
    def hang_threshold(ping_interval: float) -> float:
        """Seconds without an answer that mean QEMU hangs: about one ping interval
        (half the watchdog period), never less than HANG_FLOOR."""
        return max(ping_interval * 0.9, HANG_FLOOR)

    def _run(self) -> None:
        while True:
            self._ask.wait()
            self._ask.clear()
            # An error is an answer too: a domain that is gone reports STOPPED anyway.
            with contextlib.suppress(libvirt.libvirtError):
                self._dom.ioThreadInfo()
            self._asked_at = None


# -- the runner ------------------------------------------------------------------------------

_STOPPED_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "the guest powered off",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "the domain was destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "the guest crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "QEMU exited unexpectedly",
}


class Runner:
    def __init__(self, src: source.Source, *, shutdown_timeout: float | None = None,
                 user: bool = False) -> None:
        self.src = src
        self.user = user  # a user's VM (qemu-unit --user run): refuse what needs root
        self.name = src.name
        self.shutdown_timeout_override = shutdown_timeout
        self.notify = Notifier()
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.dom: libvirt.virDomain | None = None
        self.stop_requested = False
        self.destroy_started = False
        # The guest agent took the shutdown command: asking it again would only find it gone
        # with the shutting-down guest; retries press the other buttons only.
        self.agent_accepted = False
        self.checker: health.Checker | None = None
        self.checker_killed = False  # HealthOnFailure=kill destroyed the VM
        self.record: status.Status | None = None  # what status.json says
        self.saved: saved.SavedState | None = None  # restored instead of booted

    # Everything that can fail on bad input, before anything is acquired.
    def check(self) -> tuple[settings.VMConfig, host.Plan, ET.Element]:
        vm = settings.load_vm(self.src)
        if self.user and (problems := rootless.refusals(vm)):
            raise problems[0]
        if vm.image_source is not None:
            from qemu_unit.vm.image import wait_for_pull

            wait_for_pull(vm, self.notify)
        plan = host.plan(vm)
        host.check_ports(vm)
        host.check_share_daemons(vm)
        return vm, plan, domain.build(vm, plan)

    def run(self) -> int:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.notify.status("Checking configuration")
        vm, plan, tree = self.check()
        log.trace("planned")
        self.vm = vm
        self.plan = plan
        xml = domain.serialize(tree)
        self.xml = xml
        dirs = plan.dirs
        if os.environ.get(paths.HOST_ACCESS_ENV) and not self.user:
            # The guest firewall's root step ran before; no guest without it (exit 78).
            # Imported here: ~5 ms (socket, ipaddress) only VMs on a user network pay.
            from qemu_unit.vm import firewall

            firewall.require(dirs.root)
        accel = str(plan.accel)
        self.shutdown_timeout = (
            self.shutdown_timeout_override
            if self.shutdown_timeout_override is not None
            else vm.shutdown_timeout
        )
        log.set_vm_fields(self.name, str(vm.uuid) if vm.uuid else None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(locked_root(dirs.root))
            # Under the lock: a leftover partial save is ours to remove.
            self.saved = saved.check(self.name, dirs.state, xml, base_identity(plan),
                                     logger.warning)
            prepare_root(dirs)
            caps.seed(dirs.cache)
            prepare_guest_files(vm, plan, stack)
            self.notify.status("Starting")
            start_event_loop()
            conn = self._open(dirs)
            log.trace("connected")
            stack.callback(log.trace, "connection-closed")
            stack.callback(self._close, conn)
            console = None
            if vm.console is settings.ConsoleMode.JOURNAL:
                console = Console(
                    dirs.console_socket,
                    log.console_sink(self.name),
                    Policy.for_vm(vm, dirs.logs),
                    attach_path=dirs.attach_socket,
                )
                if vm.ready.kind is settings.ReadyKind.CONSOLE:
                    assert vm.ready.regex is not None
                    pattern = re.compile(vm.ready.regex)
                    console.watchers.append(
                        lambda line: self.events.put(GuestReady()) if pattern.search(line) else None
                    )
                console.listen(header=f"-- qemu-unit: console of {self.name} from "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} --\n")
                stack.callback(log.trace, "console-closed")
                stack.callback(console.close)
            self.control = control.Context(
                self.name, vm, domain=lambda: self.dom, post=self.events.put
            )
            server = control.Server(dirs.control_socket, self.control)
            server.listen()
            stack.callback(server.close)
            log.trace("listening")
            late = late_modules(vm, dirs)
            with self.running_domain(conn, xml, dirs, late):
                assert self.dom is not None
                log.trace("created")
                if plan.credentials:
                    # QEMU has read them: they need not lie around any longer.
                    from qemu_unit.vm import credentials

                    credentials.remove(dirs.root)
                from qemu_unit.vm import status  # loaded during createXML

                if BACKUP_MODULE in late:
                    from qemu_unit.vm import backup  # loaded during createXML

                    # The embed root forgot them at the last stop; their bitmaps are in
                    # the disks.
                    backup.redefine_checkpoints(self.dom, dirs.state, logger.warning)
                uuid = self.dom.UUIDString()
                log.set_vm_fields(self.name, uuid)
                if self.saved is not None:
                    logger.info("Restored VM %s from its saved state of %s (%s, uuid %s)",
                                self.name, time.strftime("%Y-%m-%d %H:%M:%S",
                                                         time.localtime(self.saved.created)),
                                accel.upper(), uuid)
                    # Restored: the save is spent (a later save starts afresh).
                    saved.discard(dirs.state)
                    self._sync_clock(stack)
                else:
                    logger.info("Started VM %s (%s, uuid %s)", self.name, accel.upper(), uuid)
                memory, cpus = domainxml.resources(tree)
                self.record = status.Status(
                    name=self.name,
                    pid=os.getpid(),
                    qemu_pid=status.qemu_pid(dirs.root, self.name),
                    uuid=uuid,
                    accelerator=accel,
                    memory=memory,
                    cpus=cpus,
                    ports=tuple(status.Port(p.host_ip, p.host_port, p.guest_port, p.protocol)
                                for p in vm.publish_ports),
                    started=int(time.time()),
                )
                if vm.health_cmd is not None:
                    from qemu_unit.vm import health  # loaded during createXML

                    self.checker = health.Checker(vm, lambda: self.dom, self.events.put)
                    self.record = self.record._replace(health=self.checker.health)
                    self.checker.start()
                    stack.callback(self.checker.stop)
                (dirs.root / UUID_FILE).write_text(uuid.replace("-", "").lower() + "\n")
                status.write(dirs.root, self.record)
                if vm.ready.kind is settings.ReadyKind.STARTED:
                    self.notify.ready(f"Running ({accel.upper()})")
                    log.trace("ready")
                elif vm.ready.kind is settings.ReadyKind.HEALTHY:
                    self.notify.status("Waiting for the first health check to pass")
                elif vm.ready.kind is settings.ReadyKind.AGENT:
                    self.notify.status("Waiting for the guest agent to answer")
                    self._watch_agent(stack)
                elif self.saved is not None:
                    # The guest printed its ready line before the save.
                    self.events.put(GuestReady())
                else:
                    self.notify.status(
                        f"Waiting for the guest's console to match {vm.ready.regex!r}"
                    )
                code = self.loop(dirs)
                log.trace("unwinding")
                return code

    def _watch_agent(self, stack: contextlib.ExitStack) -> None:
        """Ready=agent: ask the guest agent until it answers, then report readiness."""
        done = threading.Event()
        stack.callback(done.set)
        dom = self.dom
        assert dom is not None

        def ask() -> None:
            while not done.is_set():
                try:
                    dom.getTime()  # guest-get-time: answered by the agent itself
                except libvirt.libvirtError:
                    done.wait(AGENT_POLL)
                    continue
                self.events.put(GuestReady())
                return

        threading.Thread(target=ask, name="agent-ready", daemon=True).start()

    def _sync_clock(self, stack: contextlib.ExitStack) -> None:
        """After a restore the guest clock stands where it was saved: once the guest agent
        answers, have it set the clock from the host (guest-set-time)."""
        done = threading.Event()
        stack.callback(done.set)
        dom = self.dom
        assert dom is not None
        deadline = time.monotonic() + CLOCK_SYNC_WINDOW

        def sync() -> None:
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    dom.setTime(None, libvirt.VIR_DOMAIN_TIME_SYNC)
                except libvirt.libvirtError:
                    done.wait(AGENT_POLL)
                    continue
                logger.info("Set the guest clock through the guest agent")
                return
            if not done.is_set():
                logger.warning("The guest clock stands where it was saved: no guest agent set "
                               "it within %d s", CLOCK_SYNC_WINDOW)

        threading.Thread(target=sync, name="clock-sync", daemon=True).start()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # SimpleQueue.put is reentrant: safe from a signal handler.
        self.events.put(Signalled(signum))

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if dom.name() == self.name:
            self.events.put(Lifecycle(event, detail))

    def _on_reboot(self, _conn: Any, dom: Any, _opaque: Any) -> None:
        if dom.name() == self.name:
            self.events.put(Rebooted())

    def _on_io_error(
        self, _conn: Any, dom: Any, path: str, alias: str, action: int, reason: str, _opaque: Any
    ) -> None:
        if dom.name() == self.name:
            self.events.put(DiskError(path or alias, action, reason))

    def _open(self, dirs: Dirs) -> libvirt.virConnect:
        uri = f"qemu:///embed?root={dirs.root}"
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            msg = _libvirt_message(e)
            lowered = msg.lower()
            # Our own flock is taken first: only a foreign process (virt-qemu-run) gets here.
            if ("pid" in lowered and "lock" in lowered) or "acquire" in lowered:
                raise ConfigError(f"embed root is locked: {msg}", path=dirs.root) from None
            raise QemuUnitError(f"cannot open {uri}: {msg}") from None
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None)
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._on_io_error, None
        )
        return conn

    def _close(self, conn: libvirt.virConnect) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    @contextlib.contextmanager
    def running_domain(
        self, conn: libvirt.virConnect, xml: str, dirs: Dirs, late: tuple[str, ...]
    ) -> Iterator[libvirt.virDomain]:
        # A runner killed with SIGKILL outside systemd leaves its QEMU running; libvirt
        # reconnects to it when the root is opened again. It is stale: remove it.
        with contextlib.suppress(libvirt.libvirtError):
            stale = conn.lookupByName(self.name)
            if stale.isActive():
                logger.warning("Destroying a stale instance of %s left by an earlier runner",
                               self.name)
                stale.destroy()
        loader = threading.Thread(target=load_late_modules, args=(late,), name="imports",
                                  daemon=True)
        loader.start()
        try:
            with probe_lock(dirs.cache):
                if self.saved is not None:
                    self.notify.status("Restoring the saved state")
                    self._restore(conn, self.saved)
                else:
                    self.dom = conn.createXML(xml, 0)
        except libvirt.libvirtError as e:
            msg = _libvirt_message(e)
            if self.saved is not None:
                raise ConfigError(f"restoring the saved state failed: {msg}; run "
                                  f"'qemu-unit discard-save {self.name}' to drop it and boot "
                                  "afresh", path=self.saved.dir) from None
            log_tail = _qemu_log_tail(dirs, self.name)
            if log_tail:
                logger.error("QEMU log:\n%s", log_tail)
            if _is_config_error(e):
                raise ConfigError(f"libvirt refused the domain: {msg}") from None
            raise QemuUnitError(f"starting the domain failed: {msg}") from None
        finally:
            loader.join()
        try:
            yield self.dom
        finally:
            self._ensure_gone()

    def _restore(self, conn: libvirt.virConnect, state: saved.SavedState) -> None:
        # The save image's own XML (libvirt's, with the addresses it assigned) is the
        # ABI reference; saved.check proved the rendered domain is still the one saved.
        conn.restoreFlags(os.fspath(state.memory), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        self.dom = conn.lookupByName(self.name)

    def _save(self, why: str) -> saved.SavedState | str:
        """Save the running guest into the state directory (it stops); the save, or why
        it failed (the guest then runs on)."""
        assert self.dom is not None
        state = self.plan.dirs.state
        logger.info("%s: saving the VM into %s", why, state / paths.SAVED_DIR)
        done = threading.Event()

        def progress() -> None:
            # The save blocks the main loop: while it makes progress, keep systemd's stop
            # timeout ahead of it and its watchdog fed.
            last = -1
            while not done.is_set():
                now = saved.written(state)
                if now != last:
                    self.notify.extend_timeout(60)
                    self.notify.watchdog()
                last = now
                self.notify.status(f"Saving: {now >> 20} MiB written")
                done.wait(5)

        threading.Thread(target=progress, name="save-progress", daemon=True).start()
        start = time.monotonic()
        try:
            result = saved.save(self.dom, state, self.xml, base_identity(self.plan))
        except QemuUnitError as e:
            logger.error("%s", e)
            self.notify.status("Running (the save failed)")
            return str(e)
        finally:
            done.set()
        logger.info("Saved VM %s (%d MiB in %.1fs)", self.name, result.size >> 20,
                    time.monotonic() - start)
        self.notify.status("Stopped: saved")
        return result

    def _save_on_host_shutdown(self, signame: str) -> bool:
        """HostShutdown=save while the host goes down: save instead of shutting down.
        True when the VM was saved and has stopped."""
        if self.vm.host_shutdown is not settings.HostShutdown.SAVE:
            return False
        system = saved.stop_note(self.plan.dirs.root)
        if system != "stopping":
            logger.info("Received %s outside a host shutdown (systemd's state: %s): shutting "
                        "down (HostShutdown=save saves only when the host goes down)",
                        signame, system)
            return False
        if isinstance(self._save("The host is shutting down (HostShutdown=save)"),
                      saved.SavedState):
            return True
        logger.warning("Shutting the guest down instead")
        return False

    def _ensure_gone(self) -> None:
        assert self.dom is not None
        try:
            if self.dom.isActive():
                logger.warning("Destroying %s on the way out", self.name)
                self.dom.destroy()
        except libvirt.libvirtError:
            pass

    def loop(self, dirs: Dirs) -> int:
        assert self.dom is not None
        # The start is over (READY=1 is out, or the guest is on its way to it): what lives
        # now lives as long as the runner. The collector back on for the rest (startup).
        startup.resume()
        wd = self.notify.watchdog_usec
        wd_interval = wd / 2e6 if wd else None
        probe = MonitorProbe(self.dom) if wd_interval else None
        next_wd = time.monotonic()
        deadline: float | None = None
        next_extend = 0.0
        next_retry = 0.0
        next_resume: float | None = None  # set while the guest is paused on a disk error
        ready = self.vm.ready.kind is settings.ReadyKind.STARTED
        while True:
            now = time.monotonic()
            waiting = deadline is not None and not self.destroy_started
            wakeups = [t for t in (deadline, next_extend, next_retry) if waiting and t]
            if wd_interval:
                wakeups.append(next_wd)
            if next_resume is not None:
                wakeups.append(next_resume)
            timeout = max(0.0, min(wakeups) - now) if wakeups else None
            item: Event
            try:
                item = self.events.get(timeout=timeout)
            except queue.Empty:
                item = Tick()
            match item:
                case Lifecycle(event=libvirt.VIR_DOMAIN_EVENT_STOPPED, detail=detail):
                    log.trace("guest-stopped")
                    return self._stopped(detail, dirs)
                case Lifecycle(event=libvirt.VIR_DOMAIN_EVENT_SHUTDOWN):
                    log.trace("guest-shutdown")
                    logger.info("Guest shut down")
                case Rebooted():
                    logger.info("Guest rebooted")
                case DiskError() if next_resume is None:
                    # Every retry that fails again reports anew: say it once per episode.
                    next_resume = self._disk_error(item)
                case GuestReady() if not ready:
                    ready = True
                    if self.vm.ready.kind is settings.ReadyKind.AGENT:
                        logger.info("The guest agent answered: ready")
                    else:
                        logger.info("Guest console matched %r: ready", self.vm.ready.regex)
                    self.notify.ready("Running")
                    log.trace("ready")
                case HealthChecked(health=checked, before=before):
                    if self._on_health(checked, before, dirs, ready):
                        ready = True
                    if self.checker_killed:
                        return 1
                case SaveRequested(reply=reply):
                    if self.stop_requested:
                        reply({"error": "the VM is already stopping"})
                        continue
                    result = self._save("Asked to save (qemu-unit save)")
                    if isinstance(result, str):
                        reply({"error": result})
                        continue
                    reply({"size": result.size, "dir": os.fspath(result.dir)})
                    return 0
                case Signalled() | StopRequested():
                    signame = _signal_name(item.signum) if isinstance(item, Signalled) else ""
                    why = f"received {signame}" if signame else getattr(item, "reason", "")
                    if (signame and not self.stop_requested
                            and self._save_on_host_shutdown(signame)):
                        return 0
                    if not self.stop_requested:
                        log.trace("stop-requested")
                        self.stop_requested = True
                        deadline = time.monotonic() + self.shutdown_timeout
                        logger.info("%s: shutting the guest down (timeout %gs)",
                                    why[:1].upper() + why[1:], self.shutdown_timeout)
                        self.notify.stopping(f"Shutting down ({why})")
                        next_extend = 0.0
                        next_retry = time.monotonic() + SHUTDOWN_RETRY
                        self._request_shutdown()
                        log.trace("shutdown-asked")
                    elif not self.destroy_started and signame:
                        logger.warning("Received %s again: destroying the VM now", signame)
                        self._destroy()
            now = time.monotonic()
            if deadline is not None and not self.destroy_started:
                if now >= deadline:
                    logger.warning(
                        "Guest did not shut down within %gs: destroying it", self.shutdown_timeout
                    )
                    self._destroy()
                    continue
                if now >= next_extend:
                    # Keep systemd's stop timeout ahead of ours, however they are configured.
                    self.notify.extend_timeout(deadline - now + 15)
                    next_extend = now + 5
                if now >= next_retry:
                    next_retry = now + SHUTDOWN_RETRY
                    self._request_shutdown(again=True)
            if next_resume is not None and now >= next_resume:
                next_resume = self._resume_after_io_error(now)
            if probe and wd_interval and now >= next_wd:
                next_wd = now + wd_interval
                # About half a watchdog period (at least HANG_FLOOR) without an answer.
                silent = probe.unanswered_for()
                if silent >= probe.hang_threshold(wd_interval):
                    return self._hung(silent, dirs)
                probe.ask()
                try:
                    # state(), not info(): libvirt 9.0's info() warns on every call that
                    # it cannot parse /proc stat lines of QEMU's "CPU 0/TCG" threads.
                    self.dom.state()
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # gone: STOPPED follows
                        logger.error("libvirt does not answer for the domain: %s", e)
                else:
                    self.notify.watchdog()

    def _disk_error(self, error: DiskError) -> float | None:
        """Report ERROR; when the guest is paused for it, when to try resuming."""
        if error.action != libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE:
            logger.warning("Disk %s: I/O error (%s)", error.device, error.reason)
            return None
        what = "no space left on device" if error.reason == "enospc" else error.reason
        logger.error("Disk %s: %s; the guest is paused and resumes once the write succeeds "
                     "(retried every %gs)", error.device, what, RESUME_RETRY)
        self.notify.status(f"Paused: disk {error.device}: {what}")
        return time.monotonic() + RESUME_RETRY

    def _on_health(self, now: status.Health, before: str, dirs: Dirs, ready: bool) -> bool:
        """A health check ended: the status file, and on a change of state the journal,
        STATUS=, Ready=healthy and HealthOnFailure=. True when this made the unit ready."""
        if self.record is not None:
            self.record = self.record._replace(health=now)
            from qemu_unit.vm import status

            with contextlib.suppress(OSError):
                status.write(dirs.root, self.record)
        if now.status == before:
            return False
        from qemu_unit.vm import health

        fields = {"QEMU_UNIT_HEALTH": now.status,
                  "QEMU_UNIT_HEALTH_STREAK": str(now.failing_streak),
                  "QEMU_UNIT_HEALTH_OUTPUT": now.last_output}
        level = logging.WARNING if now.status == health.UNHEALTHY else logging.INFO
        logger.log(level, "Health: %s -> %s (failing streak %d; last output: %s)", before,
                   now.status, now.failing_streak, now.last_output or "-", extra=fields)
        became_ready = False
        if (now.status == health.HEALTHY and not ready
                and self.vm.ready.kind is settings.ReadyKind.HEALTHY):
            logger.info("The first health check passed: ready")
            self.notify.ready(f"Running ({now.status})")
            became_ready = True
        elif not self.stop_requested:
            self.notify.status(f"Running ({now.status})")
        if now.status != health.UNHEALTHY or self.stop_requested:
            return became_ready
        action = self.vm.health_on_failure
        if action is settings.HealthAction.KILL:
            logger.error("Unhealthy with HealthOnFailure=kill: destroying the VM")
            self._destroy()
            self.notify.status("Failed: unhealthy (HealthOnFailure=kill)")
            self.checker_killed = True
        elif action is settings.HealthAction.STOP:
            self.events.put(StopRequested("the VM is unhealthy (HealthOnFailure=stop)"))
        elif action is settings.HealthAction.RESTART:
            logger.warning("Unhealthy with HealthOnFailure=restart: resetting the guest")
            assert self.dom is not None and self.checker is not None
            try:
                self.dom.reset()
            except libvirt.libvirtError as e:
                logger.error("Resetting the guest failed: %s", _libvirt_message(e))
            else:
                self.checker.restart()
        return became_ready

    def _resume_after_io_error(self, now: float) -> float | None:
        """Resume a guest paused by a disk error; None once it keeps running."""
        assert self.dom is not None
        try:
            state, reason = self.dom.state()
            if state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                logger.info("Guest runs again after the disk error")
                self.notify.status("Running")
                return None
            self.dom.resume()
        except libvirt.libvirtError as e:
            logger.warning("Resuming after the disk error failed: %s", _libvirt_message(e))
        return now + RESUME_RETRY

    def _hung(self, silent: float, dirs: Dirs) -> int:
        """QEMU stopped answering its monitor: kill it and fail, so that systemd restarts."""
        logger.error(
            "QEMU has not answered its monitor for %.1fs: it is hung; killing it", silent
        )
        self.notify.status(f"Failed: QEMU hung (no monitor answer for {silent:.0f}s)")
        self.destroy_started = True
        # destroy() alone waits 10 s for a hung QEMU to honour SIGTERM first.
        pidfile = paths.qemu_pidfile(dirs.root, self.name)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        assert self.dom is not None
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        return 1

    def _request_shutdown(self, again: bool = False) -> None:
        assert self.dom is not None
        for mode in self.vm.shutdown_mode:
            if mode.value == "agent" and self.agent_accepted:
                continue
            flag = (
                libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
                if mode is settings.ShutdownMethod.AGENT
                else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
            )
            try:
                self.dom.shutdownFlags(flag)
            except libvirt.libvirtError as e:
                logger.warning("Shutdown via %s failed: %s", mode.value, _libvirt_message(e))
                continue
            again_ = "again " if again else ""
            logger.info("Asked the guest %sto shut down (%s)", again_, mode.value)
            self.agent_accepted = self.agent_accepted or mode.value == "agent"
            return
        logger.warning("No shutdown method worked; waiting for the timeout")

    def _destroy(self) -> None:
        assert self.dom is not None
        self.destroy_started = True
        self.notify.status("Destroying")
        try:
            self.dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                logger.error("Destroying the domain failed: %s", _libvirt_message(e))

    def _stopped(self, detail: int, dirs: Dirs) -> int:
        reason = _STOPPED_REASONS.get(detail, f"stopped (reason {detail})")
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN or (
            detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED and self.destroy_started
        ):
            logger.info("VM %s stopped: %s", self.name, reason)
            self.notify.status(f"Stopped: {reason}")
            return 0
        tail = _qemu_log_tail(dirs, self.name)
        logger.error(
            "VM %s stopped: %s%s", self.name, reason, f"\nQEMU log:\n{tail}" if tail else ""
        )
        self.notify.status(f"Failed: {reason}")
        return 1


def base_identity(plan: host.Plan) -> dict[str, Any] | None:
    """What a save records of the Image= base (path, size, mtime, inode)."""
    if plan.image is None:
        return None
    from qemu_unit.vm import image

    return image.identity(plan.image.base)


def prepare_guest_files(
    vm: settings.VMConfig, plan: host.Plan, stack: contextlib.ExitStack
) -> None:
    """Make the files PLAN names before the domain starts: the overlay, the seed, the
    credential files. STACK removes what must not outlive the VM."""
    if plan.image is not None:
        from qemu_unit.vm import image

        image.prepare_overlay(vm, plan.image)
        if vm.ephemeral:
            stack.callback(plan.image.overlay.unlink, missing_ok=True)
    if plan.seed is not None:
        from qemu_unit.vm import seed

        # cloud-init reads it at every boot of the guest: it stays until the VM stops.
        stack.callback(plan.seed.unlink, missing_ok=True)
        seed.write_iso(seed.from_vm(vm), plan.seed)
    if plan.credentials:
        from qemu_unit.vm import credentials

        stack.callback(credentials.remove, plan.dirs.root)
        credentials.write_files(vm, plan.credentials, plan.dirs.root)


def _signal_name(signum: int) -> str:
    if signum == signal.SIGRTMIN + 4:
        return "SIGRTMIN+4"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _qemu_log_tail(dirs: Dirs, name: str, lines: int = 15) -> str:
    path = paths.qemu_log(dirs.root, name)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _service_user(user: str) -> Any:
    import pwd

    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise QemuUnitError(
            f"running as root needs the user {user!r} (run 'qemu-unit install' first)"
        ) from None


def become_service_user(name: str, user: str = SERVICE_USER) -> None:
    """Started as root by hand (the unit sets User= itself): create and hand over the
    system directories of VM NAME, then run as the service user."""
    import grp

    pw = _service_user(user)
    dirs = paths.finalize_dirs(name)
    for d in (dirs.state, dirs.root, dirs.cache, dirs.logs):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        with contextlib.suppress(OSError):
            st = d.parent.stat()
            # The service user must reach D: add read and search for everyone, take nothing
            # away (the parent may be /tmp, 1777: a plain 0755 made it root's alone).
            if st.st_uid == 0 and st.st_mode & 0o755 != 0o755:
                os.chmod(d.parent, (st.st_mode & 0o7777) | 0o755)
    for var, d in (
        ("STATE_DIRECTORY", dirs.state),
        ("RUNTIME_DIRECTORY", dirs.root),
        ("CACHE_DIRECTORY", dirs.cache),
        ("LOGS_DIRECTORY", dirs.logs),
    ):
        os.environ.setdefault(var, os.fspath(d))
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(groups)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = user


def run(name: str, *, shutdown_timeout: float | None = None,
        search_path: list[Path] | None = None, user: bool = False) -> int:
    """`qemu-unit run NAME`: find the VM (the one check of NAME), then run it."""
    src = source.find_source(name, search_path)
    if os.geteuid() == 0 and not os.environ.get("INVOCATION_ID"):
        become_service_user(src.name)
    return Runner(src, shutdown_timeout=shutdown_timeout, user=user).run()


def prepare_caps(root: Path, shared: Path = caps.SHARED) -> int:
    """`qemu-unit prepare-caps`: make SHARED current (probing QEMU if it is cold or stale)
    and readable by every VM's user. The unit's embed ROOT is thrown away afterwards."""
    probed = shared / paths.CAPABILITIES
    before = {p.name: p.stat().st_mtime_ns for p in probed.glob("*.xml")}
    if not before:
        logger.info("QEMU capability cache is cold: probing (VMs starting now wait)")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    prepare_root(Dirs(state=root / "state", root=root, cache=shared, logs=root / "logs"))
    start_event_loop()
    started = time.monotonic()
    conn = libvirt.open(f"qemu:///embed?root={root}")
    try:
        for accel in ("kvm", "qemu"):
            try:
                conn.getDomainCapabilities(None, "x86_64", None, accel)
                break
            except libvirt.libvirtError:
                continue  # no KVM here: TCG's answer comes from the same probe
    finally:
        conn.close()
    after = {p.name: p.stat().st_mtime_ns for p in probed.glob("*.xml")}
    if after != before:
        logger.info("Probed QEMU's capabilities in %.1fs", time.monotonic() - started)
    for path in (shared, shared / "qemu", probed, *probed.glob("*.xml")):
        # libvirt writes 0600; every VM's user reads them.
        path.chmod(0o755 if path.is_dir() else 0o644)
    return 0
