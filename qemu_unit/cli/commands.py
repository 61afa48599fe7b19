"""The `qemu-unit` command (its options: arguments.py). The only place that turns errors
into exit statuses."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qemu_unit import log, paths, startup
from qemu_unit.cli.arguments import build_parser, command_of, systemd_run
from qemu_unit.errors import ConfigError, QemuUnitError

# At module level only what `run` needs anyway: each module more delays every VM's start;
# the other commands import what they use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

    from qemu_unit.config import settings


def _search_path(args: argparse.Namespace) -> list[Path] | None:
    if getattr(args, "config_dir", None):
        return [Path(d) for d in args.config_dir]
    if args.user:
        from qemu_unit.config import source

        return list(source.search_path(user=True))
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from qemu_unit.vm import runner

    log.trace("imported")
    code = runner.run(
        args.name, shutdown_timeout=args.shutdown_timeout, search_path=_search_path(args),
        user=args.user,
    )
    log.trace("exit")
    return code


def cmd_console(args: argparse.Namespace) -> int:
    from qemu_unit.cli import attach

    return attach.attach(args.name, read_only=args.read_only, user=args.user)


def cmd_render(args: argparse.Namespace) -> int:
    from qemu_unit.config import settings, source
    from qemu_unit.vm import domain, host

    vm = settings.load_vm(source.find_source(args.name, _search_path(args)))
    sys.stdout.write(domain.render(vm, host.plan(vm)))
    return 0


def _is_file(target: str) -> bool:
    """TARGET is a file when it names one: a path, or NAME.vm/NAME.xml that exists here."""
    path = Path(target)
    return "/" in target or (path.suffix in (".vm", ".xml") and path.exists())


def validate(targets: Sequence[str], search_path: Sequence[Path] | None = None,
             user: bool = False) -> list[str]:
    """Check each target; one message per invalid one. No target: everything visible.
    USER: as a user's VM (what needs root is refused).

    Nothing here depends on this host's KVM: a VM is checked as its configuration says.
    """
    from qemu_unit.config import rootless, settings, source
    from qemu_unit.vm import host

    problems: list[str] = []
    found: list[source.Source] = []
    if not targets:
        errors: list[ConfigError] = []
        found = list(source.list_sources(search_path, errors=errors))
        problems += [str(e) for e in errors]
    every: list[str | source.Source] = [*targets, *found]
    for target in every:
        try:
            if isinstance(target, source.Source):
                src = target
            elif _is_file(target):
                src = source.from_file(Path(target))
            else:
                src = source.find_source(target, search_path)
            vm = settings.load_vm(src)
            if user and (refused := rootless.refusals(vm)):
                raise refused[0]
            host.plan(vm, probe=False)
        except QemuUnitError as e:
            problems.append(str(e))
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    problems = validate(args.targets, _search_path(args), args.user)
    for problem in problems:
        log.log.error("%s", problem)
    return os.EX_CONFIG if problems else 0


def _systemd_problem(problem: str | None) -> None:
    if problem:
        log.log.warning("unit states unknown: %s", problem)


def cmd_list(args: argparse.Namespace) -> int:
    from qemu_unit.cli import overview

    vms, problem = overview.collect(search_path=_search_path(args), user=args.user)
    _systemd_problem(problem)
    sys.stdout.write(overview.list_json(vms) + "\n" if args.json else overview.list_text(vms))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from qemu_unit.cli import overview

    vm, problem = overview.find_one(args.name, _search_path(args), user=args.user)
    _systemd_problem(problem)
    console = overview.console_lines(vm, args.lines, args.user) if args.lines > 0 else []
    if args.json:
        sys.stdout.write(overview.status_json(vm, console) + "\n")
    else:
        sys.stdout.write(overview.status_text(vm, console))
    return 0


def cmd_register_machine(args: argparse.Namespace) -> int:
    from qemu_unit.vm import machine

    return machine.register_from_unit(args.name)


def cmd_guest_firewall(args: argparse.Namespace) -> int:
    from qemu_unit.vm import firewall

    return firewall.from_environment(args.name, args.action)


def cmd_prepare_caps(args: argparse.Namespace) -> int:
    from qemu_unit.vm import caps, runner

    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if not runtime:
        raise QemuUnitError("prepare-caps runs in qemu-unit-caps.service (no RUNTIME_DIRECTORY)")
    shared = Path(os.environ.get("CACHE_DIRECTORY") or caps.SHARED)
    return runner.prepare_caps(Path(runtime), shared)


def cmd_note_stop(args: argparse.Namespace) -> int:
    from qemu_unit.vm import saved

    return saved.note_stop(args.name)


def cmd_reset(args: argparse.Namespace) -> int:
    from qemu_unit.config.names import check_name
    from qemu_unit.vm import image

    dirs = paths.finalize_dirs(check_name(args.name))
    removed = image.reset(args.name, dirs.state, dirs.root)
    for path in removed:
        print(f"removed {path}", file=sys.stderr)
    if not removed:
        print(f"{args.name}: nothing to reset in {dirs.state}", file=sys.stderr)
    return 0


def _backup_schedule(args: argparse.Namespace) -> tuple[Path, int]:
    """--scheduled: the directory and the number kept of the VM's BackupSchedule=."""
    from qemu_unit.config import settings, source

    found = source.find_source(args.name, _search_path(args))
    vm = settings.load_vm(found)
    if vm.backup_to is None:
        raise ConfigError(f"VM {args.name} has no BackupSchedule=/BackupTo=: nothing "
                          "scheduled", path=vm.source_path, key="BackupTo")
    if args.dir not in (None, vm.backup_to):
        raise QemuUnitError(f"backup --scheduled writes to BackupTo= ({vm.backup_to}), "
                         f"not {args.dir}")
    return vm.backup_to, vm.backup_keep


def cmd_backup(args: argparse.Namespace) -> int:
    from qemu_unit.cli import backup

    started = time.monotonic()
    if args.scheduled:
        args.dir, args.keep = _backup_schedule(args)
    elif args.dir is None:
        raise QemuUnitError("backup: DIR is needed (or --scheduled: the VM's BackupTo=)")
    point = backup.run_backup(args.name, args.dir, standalone=args.standalone, full=args.full,
                              keep=args.keep, search_path=_search_path(args))
    size = sum(d.file.size for d in point.disks)
    kind = f"incremental from {point.parent}" if point.parent else "full"
    print(f"backup {point.id} of {args.name} in {args.dir}: {kind}, {point.consistency}, "
          f"disks {size / 2**20:.1f} MiB, {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from qemu_unit.cli import backup

    if args.list:
        for p in backup.list_points(args.dir):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.created))
            size = sum(d.file.size for d in p.disks)
            print(f"{p.id}\t{when}\t{'incremental' if p.parent else 'full'}\t"
                  f"{p.consistency}\t{size / 2**20:.1f} MiB")
        return 0
    name, point = backup.restore(args.dir, args.as_name, args.point)
    print(f"restored VM {name} from point {point.id} of {args.dir}: run systemctl "
          f"daemon-reload, then systemctl start {paths.unit_name(name)}", file=sys.stderr)
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from qemu_unit.cli import images
    from qemu_unit.images.cache import Cache

    cache = Cache()
    if args.image_command == "pull":
        src = images.source_from_args(args)
        if args.key and args.key != src.key():
            raise QemuUnitError(f"the arguments name source {src.key()}, not {args.key}: "
                                "run systemctl daemon-reload")
        images.print_ref(cache, images.pull(src, cache, update=args.update))
    elif args.image_command == "list":
        items = images.entries(cache, _search_path(args))
        sys.stdout.write(images.list_json(items) + "\n" if args.json
                         else images.list_text(items))
    elif args.image_command == "prune":
        for e in images.prune(cache, _search_path(args), dry_run=args.dry_run):
            print(f"{'would remove' if args.dry_run else 'removed'} {e.digest} "
                  f"({e.size} bytes)", file=sys.stderr)
    else:
        for digest in images.remove(cache, args.images, _search_path(args), force=args.force):
            print(f"removed {digest}", file=sys.stderr)
    return 0


def cmd_auto_update(args: argparse.Namespace) -> int:
    from qemu_unit.cli import autoupdate

    return autoupdate.run(dry_run=args.dry_run, search_path=_search_path(args))


def cmd_save(args: argparse.Namespace) -> int:
    from qemu_unit.cli import control
    from qemu_unit.config.names import check_name
    from qemu_unit.vm import image

    seen: dict[str, object] = {}
    try:
        control.call(args.name, {"op": "save"}, lambda line: seen.update(line))
    except control.ControlFailed as e:
        # The runner may end before its final line is out: the intermediate one counts.
        if "saved" not in seen or e.code != "not-running":
            raise
    dirs = paths.finalize_dirs(check_name(args.name))
    deadline = time.monotonic() + 300
    while image.is_running(dirs.root) and time.monotonic() < deadline:
        time.sleep(0.1)  # the runner is on its way out: QEMU is already gone
    _wait_unit_stopped(args.name, args.user, deadline)
    result = seen.get("saved")
    size = result.get("size", 0) if isinstance(result, dict) else 0
    print(f"saved {args.name}: {int(size) >> 20} MiB in {dirs.state / paths.SAVED_DIR}",
          file=sys.stderr)
    return 0


def _wait_unit_stopped(name: str, user: bool, deadline: float) -> None:
    """Until NAME's unit has stopped: the runner has exited, but systemd may not have
    noticed yet (still "active" for a moment, then ExecStop=): a `systemctl start` right
    after `qemu-unit save` would find it active, do nothing, and the VM would stay stopped.
    Nothing to wait for when the unit is not known to systemd (`qemu-unit run` by hand)."""
    from qemu_unit import command

    unit = paths.unit_name(name)
    while time.monotonic() < deadline:
        try:
            state = command.run(["systemctl", *(["--user"] if user else []), "show",
                                 "--property=ActiveState", "--value", unit],
                                "asking systemd for the unit's state", timeout=10).strip()
        except QemuUnitError:
            return  # no systemd to ask
        if state not in ("active", "deactivating", "reloading"):
            return
        time.sleep(0.1)


def cmd_discard_save(args: argparse.Namespace) -> int:
    from qemu_unit.config.names import check_name
    from qemu_unit.vm import image, saved

    dirs = paths.finalize_dirs(check_name(args.name))
    if image.is_running(dirs.root):
        raise QemuUnitError(f"VM {args.name} is running: stop it first "
                            f"(systemctl stop {paths.unit_name(args.name)})")
    removed = saved.discard(dirs.state)
    for path in removed:
        print(f"removed {path}", file=sys.stderr)
    if not removed:
        print(f"{args.name}: no saved state in {dirs.state}", file=sys.stderr)
    return 0


def _rendered(args: argparse.Namespace) -> tuple[settings.VMConfig, str]:
    """The VM and its domain XML as the runner would build it (what a snapshot holds)."""
    from qemu_unit.config import settings, source
    from qemu_unit.vm import domain, host

    vm = settings.load_vm(source.find_source(args.name, _search_path(args)))
    return vm, domain.render(vm, host.plan(vm, probe=False))


def cmd_snapshot(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from qemu_unit.cli import control
    from qemu_unit.config.names import check_name
    from qemu_unit.vm import image, snapshot

    dirs = paths.finalize_dirs(check_name(args.name))
    verb = args.snapshot_command
    if verb == "list":
        found = snapshot.read_all(dirs.state)
        if args.json:
            print(json.dumps([asdict(s) for s in found], indent=2))
        for s in [] if args.json else found:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created))
            print(f"{s.name}\t{when}\t{s.consistency}\t{len(s.disks)} disk(s)"
                  f"{' + NVRAM' if s.nvram else ''}")
        return 0
    running = image.is_running(dirs.root)
    if verb == "revert":
        if running:
            raise QemuUnitError(f"VM {args.name} is running: stop it first "
                                f"(systemctl stop {paths.unit_name(args.name)})")
        _vm, xml = _rendered(args)
        _found, dropped = snapshot.revert(dirs.state, xml, snapshot.check_name(args.snapshot))
        if dropped:
            print(f"dropped backup checkpoint(s) {', '.join(dropped)}: the next backup of "
                  f"{args.name} is a full one", file=sys.stderr)
        print(f"reverted {args.name} to {args.snapshot}", file=sys.stderr)
        return 0
    vm, xml = _rendered(args)
    if verb == "create":
        name = snapshot.check_name(args.snapshot or snapshot.unused_name(
            dirs.state, snapshot.AUTO_PREFIX if args.scheduled else ""))
        if running:
            made = control.call(args.name, {"op": "snapshot-create", "snapshot": name})
            consistency = made["snapshot"]["consistency"]
        else:
            consistency = snapshot.create(dirs.state, xml, name).consistency
        print(f"snapshot {name} of {args.name} ({consistency})", file=sys.stderr)
        gone: list[str] = []
        if args.scheduled and vm.snapshot_keep:
            if running:
                gone = control.call(args.name, {"op": "snapshot-delete",
                                                "prune": vm.snapshot_keep})["deleted"]
            else:
                gone = snapshot.prune(dirs.state, xml, vm.snapshot_keep)
        for old in gone:
            print(f"deleted {old} (SnapshotKeep={vm.snapshot_keep})", file=sys.stderr)
        return 0
    name = snapshot.check_name(args.snapshot)
    if running:
        control.call(args.name, {"op": "snapshot-delete", "snapshot": name})
    else:
        snapshot.delete(dirs.state, xml, name)
    print(f"deleted snapshot {name} of {args.name}", file=sys.stderr)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from qemu_unit.cli import install

    install.install(Path(args.root), Path(args.prefix), reload=not args.no_reload)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from qemu_unit.cli import install

    install.uninstall(Path(args.root), Path(args.prefix), reload=not args.no_reload)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qemu_unit.cli import demo

    if args.image:
        key = (demo.first_key(Path(args.ssh_key)) if args.ssh_key
               else demo.find_ssh_key(Path.home()))
        path = demo.write_cloud_demo(Path(args.config_dir), Path(args.image).absolute(), key)
        print(f"wrote {path}: systemctl start qemu-run@cloud, then "
              f"ssh -p {demo.CLOUD_SSH_PORT} USER@127.0.0.1 (USER: the image's default user, "
              "e.g. debian)", file=sys.stderr)
        return 0
    path = demo.write_demo(Path(args.config_dir), Path(args.data_dir), runfor=args.run_for)
    print(f"wrote {path}", file=sys.stderr)
    if not (args.run or args.run_for):
        return 0
    import argparse

    run_args = argparse.Namespace(
        name="demo", shutdown_timeout=None, config_dir=[args.config_dir], user=args.user
    )
    return cmd_run(run_args)


def cmd_kube(args: argparse.Namespace) -> int:
    import yaml

    from qemu_unit.cli import kube
    from qemu_unit.config import settings, source

    if args.kube_command == "generate":
        vm = settings.load_vm(source.find_source(args.name, _search_path(args)))
        result = kube.generate(vm, image_ref=args.image_ref)
    else:
        directory = Path(args.dir) if args.dir else source.search_path(user=args.user)[0]
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise ConfigError(f"not YAML: {e}", path=args.file) from None
        name, result = kube.play(documents, directory.absolute())
    for note in result.notes:
        print(f"qemu-unit: {note}", file=sys.stderr)
    if args.strict and result.notes:
        print(f"qemu-unit: {len(result.notes)} thing(s) cannot be expressed (--strict)",
              file=sys.stderr)
        return kube.EX_INEXPRESSIBLE
    if args.kube_command == "generate":
        yaml.safe_dump_all(result.documents, sys.stdout, sort_keys=False)
        return 0
    vm_file = directory / f"{name}.vm"
    if vm_file.exists():
        raise QemuUnitError(f"{vm_file} exists: remove it first")
    directory.mkdir(parents=True, exist_ok=True)
    for filename, data in result.files.items():
        path = directory / filename
        write_config(path, data)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def write_config(path: Path, data: bytes) -> None:
    """Write a file of the search path; one holding SetCredential= values root's alone
    (settings.check_secret_files refuses anything else; the unit hands it to the VM's
    runner as a credential)."""
    secret = b"SetCredential=" in data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        if secret:
            os.fchmod(f.fileno(), 0o600)
        f.write(data)


def cmd_exec(args: argparse.Namespace) -> int:
    from qemu_unit.cli import guest

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise QemuUnitError("exec: no command given (qemu-unit exec NAME [--] CMD [ARG...])")
    return guest.exec_(args.name, argv, env=args.env, user=args.guest_user,
                       timeout=args.timeout,
                       stdin=None if args.no_stdin else 0)


def cmd_cp(args: argparse.Namespace) -> int:
    from qemu_unit.cli import guest

    return guest.cp(args.src, args.dest, recursive=args.recursive)


COMMANDS = {
    "exec": cmd_exec,
    "cp": cmd_cp,
    "run": cmd_run,
    "console": cmd_console,
    "render": cmd_render,
    "validate": cmd_validate,
    "list": cmd_list,
    "status": cmd_status,
    "register-machine": cmd_register_machine,
    "guest-firewall": cmd_guest_firewall,
    "prepare-caps": cmd_prepare_caps,
    "note-stop": cmd_note_stop,
    "reset": cmd_reset,
    "save": cmd_save,
    "discard-save": cmd_discard_save,
    "snapshot": cmd_snapshot,

    "backup": cmd_backup,
    "restore": cmd_restore,
    "image": cmd_image,
    "auto-update": cmd_auto_update,
    "install": cmd_install,
    "uninstall": cmd_uninstall,
    "demo": cmd_demo,
    "kube": cmd_kube,
}


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = systemd_run(words)
    if args is None:
        command = command_of(words)
        args = build_parser(command if command in COMMANDS else None).parse_args(words)
    log.setup(verbose=args.verbose)
    log.trace("main")
    if args.user and os.geteuid() == 0:
        return _fail(args, "--user: root's VMs are the system's (/etc/qemu-run); run "
                           "qemu-unit --user as the user whose VMs they are", 2)
    if args.command != "run":
        startup.resume()  # the runner resumes it once its VM is up (Runner.loop)
    status = _dispatch(args)
    if args.command == "run" and argv is None:
        # The VM is gone and the journal has every line (sent as each was logged): the
        # interpreter's own teardown (threads, modules, the libvirt binding) would only
        # hold up systemd's "Stopped" by ~45 ms on every stop (bench/runner.py).
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)
    return status


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except QemuUnitError as e:
        return _fail(args, str(e), e.exit_status)
    except OSError as e:
        # Permissions, a full disk: say which file, without a traceback.
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args, f"{where}{e.strerror or e}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    """One log line; for `run`, the same text in the unit's STATUS=."""
    log.log.error("%s", message)
    if args.command == "run":
        from qemu_unit.vm.notify import Notifier

        Notifier().status(f"Failed: {message}")
    return status


if __name__ == "__main__":
    sys.exit(main())
