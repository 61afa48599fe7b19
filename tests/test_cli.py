"""cli.py: the `qemu-unit` command's faces: render, validate, messages and exit statuses."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_unit.cli import arguments
from qemu_unit.cli import commands as cli
from qemu_unit.config import domainxml
from qemu_unit.config.settings import Accel
from qemu_unit.vm import domain, host


@pytest.fixture
def unit_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The directories the unit gives the runner, so that render sees what run sees."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/qemu-run/x")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/qemu-run/x")
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/qemu-run")


def test_render_and_validate_honour_accel_of_a_domain_xml_vm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], unit_dirs: None
) -> None:
    (tmp_path / "full.xml").write_text(
        "<domain type='kvm'><name>x</name><memory>262144</memory>"
        "<os><type>hvm</type><kernel>/nonexistent/vmlinuz</kernel></os></domain>"
    )
    (tmp_path / "x.vm").write_text(f"[VM]\nDomainXML={tmp_path}/full.xml\nAccel=tcg\n")
    [problem] = cli.validate(["x"], [tmp_path])
    assert problem == f"{tmp_path}/full.xml: <kernel> names /nonexistent/vmlinuz, which is missing"
    [problem] = cli.validate([str(tmp_path / "x.vm")])  # by path, same answer
    assert "/nonexistent/vmlinuz" in problem
    (tmp_path / "full.xml").write_text(
        "<domain type='kvm'><name>x</name><memory>262144</memory></domain>"
    )
    assert cli.main(["render", "--config-dir", str(tmp_path), "x"]) == 0
    assert "<domain type=\"qemu\">" in capsys.readouterr().out  # Accel=tcg decides


def test_render_of_an_xml_vm_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], unit_dirs: None
) -> None:
    # Before, an .xml VM rendered its input unchanged: not what the runner starts.
    (tmp_path / "x.xml").write_text(
        "<domain type='qemu'><name>other</name><memory>262144</memory>"
        "<devices><serial type='pty'><target port='0'/></serial></devices></domain>"
    )
    assert cli.main(["render", "--config-dir", str(tmp_path), "x"]) == 0
    out = capsys.readouterr().out
    assert "<name>x</name>" in out
    assert '<source mode="connect" path="/run/qemu-run/x/console.sock" />' in out


def test_render_prints_what_the_runner_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], unit_dirs: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qemu_unit.config import source
    from qemu_unit.vm import runner

    monkeypatch.setattr(host, "kvm_problem", lambda: "/dev/kvm: test")
    for text in ("[VM]\nKernel=/dev/null\nShutdownMode=agent\nFirmware=uefi\n",):
        (tmp_path / "x.vm").write_text(text)
        assert cli.main(["render", "--config-dir", str(tmp_path), "x"]) == 0
        printed = capsys.readouterr().out
        _vm, _plan, tree = runner.Runner(source.find_source("x", [tmp_path])).check()
        assert printed == domain.serialize(tree)


def test_validate_messages_carry_the_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.vm").write_text("[VM]\nMemory=lots\n")
    assert cli.main(["validate", str(tmp_path / "bad.vm")]) == os.EX_CONFIG
    err = capsys.readouterr().err
    assert err == f"qemu-unit: {tmp_path}/bad.vm:2: Memory=: invalid size 'lots': " \
        "expected a number with K, M, G or T\n"


@pytest.mark.parametrize("command", ["render", "validate", "run"])
def test_deeply_nested_xml_is_one_line_and_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INVOCATION_ID", "test")  # no privilege dropping for `run` as root
    short = Path(tempfile.mkdtemp(prefix="qu"))  # room for the monitor socket's path
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(short / "run"))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("CACHE_DIRECTORY", str(tmp_path / "cache"))
    (tmp_path / "deep.xml").write_text(
        "<domain type='qemu'><name>d</name>" + "<a>" * 1000 + "</a>" * 1000 + "</domain>"
    )
    status = cli.main([command, "--config-dir", str(tmp_path), "deep"])
    err = capsys.readouterr().err
    assert status == os.EX_CONFIG, err
    assert err == f"qemu-unit: {tmp_path}/deep.xml: elements nested deeper than " \
        f"{domainxml.MAX_XML_DEPTH} levels\n"
    assert not (short / "run").exists()  # failed before anything was acquired
    short.rmdir()


def test_validate_does_not_depend_on_this_hosts_kvm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "kvm_problem", lambda: pytest.fail("validate probed /dev/kvm"))
    (tmp_path / "k.vm").write_text("[VM]\nAccel=kvm\n")
    assert cli.validate(["k"], [tmp_path]) == []
    assert Accel.KVM == "kvm"


@pytest.mark.parametrize("argv", [
    ["run", "web"], ["-v", "run", "web", "--shutdown-timeout", "5", "--config-dir", "/d"],
    ["--user", "console", "web", "--read-only"], ["list", "--json"], ["status", "web", "-n", "3"],
    ["image", "pull", "http://x/y.qcow2", "--checksum", "sha256:00"], ["image", "list"],
    ["register-machine", "web"], ["reset", "web"],
])
def test_the_one_command_parser_reads_argv_as_the_whole_one(argv: list[str]) -> None:
    """main() builds only the named command's parser (the runner's start-up): same result."""
    command = arguments.command_of(argv)
    assert command is not None
    assert (arguments.build_parser(command).parse_args(argv)
            == arguments.build_parser().parse_args(argv))


def _argparse(argv: list[str]) -> dict[str, object] | None:
    """What the whole parser makes of ARGV; None when it refuses it or prints help."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return vars(arguments.build_parser().parse_args(argv))
    except SystemExit:
        return None


@pytest.mark.parametrize("argv", [
    ["run", "web"], ["--user", "run", "web"], ["-v", "run", "web"], ["--verbose", "run", "web"],
    ["-v", "--user", "run", "web"], ["--user", "--verbose", "run", "web"],
    ["-v", "-v", "run", "web"], ["run", "run"], ["run", "web@1"], ["run", ""],
    ["register-machine", "web"], ["--user", "register-machine", "web"],
    ["note-stop", "web"], ["guest-firewall", "start", "web"], ["guest-firewall", "stop", "web"],
    ["-v", "guest-firewall", "stop", "run"],
])
def test_the_units_command_lines_are_read_as_argparse_reads_them(argv: list[str]) -> None:
    """The unit's `[--user] run NAME` (and -v) and its root steps skip argparse: the same
    namespace."""
    fast = arguments.systemd_run(argv)
    assert fast is not None
    command = arguments.command_of(argv)
    assert vars(fast) == _argparse(argv) == vars(arguments.build_parser(command)
                                                 .parse_args(argv))


@pytest.mark.parametrize("argv", [
    [], ["run"], ["-v"], ["run", "--help"], ["run", "-h"], ["--help", "run", "web"],
    ["-h", "run", "web"], ["run", "web", "-v"], ["run", "web", "--user"],
    ["run", "web", "--shutdown-timeout", "5"], ["run", "--shutdown-timeout", "5", "web"],
    ["run", "--config-dir", "/d", "web"], ["--verb", "run", "web"], ["--use", "run", "web"],
    ["-vv", "run", "web"], ["-x", "run", "web"], ["run", "-web"], ["run", "-1"],
    ["run", "--", "web"], ["--", "run", "web"], ["status", "web"], ["status", "run", "web"],
    ["console", "run"], ["run", "a", "b"], ["web", "run", "web"],
    ["register-machine"], ["register-machine", "a", "b"], ["register-machine", "-h"],
    ["guest-firewall", "web"], ["guest-firewall", "reload", "web"],
    ["guest-firewall", "start"], ["guest-firewall", "--help", "web"], ["note-stop", "--", "web"],
])
def test_every_other_command_line_is_left_to_argparse(argv: list[str]) -> None:
    assert arguments.systemd_run(argv) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(
    ["run", "web", "", "-v", "--verbose", "--user", "-h", "--help", "--", "-1", "-vv", "--verb",
     "--shutdown-timeout", "5", "--config-dir", "/d", "status", "list", "a b", "-x y",
     "register-machine", "note-stop", "guest-firewall", "start", "stop", "reload"]),
    max_size=5))
def test_what_the_fast_path_reads_argparse_reads_alike(argv: list[str]) -> None:
    fast = arguments.systemd_run(argv)
    if fast is not None:
        assert vars(fast) == _argparse(argv)


@pytest.mark.parametrize("extra", [[], ["--shutdown-timeout", "5"]])
def test_run_says_the_same_with_and_without_argparse(tmp_path: Path, extra: list[str]) -> None:
    """`run NAME` (the fast path) and `run NAME --shutdown-timeout 5` (argparse): the same
    message and exit status."""
    import subprocess
    import sys

    code = ("import sys; from qemu_unit.cli import main; status = main(sys.argv[1:]);"
            "print(status, 'argparse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "run", "missing", *extra],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "QEMU_RUN_PATH": str(tmp_path)})
    assert out.stdout == f"78 {bool(extra)}\n"
    assert out.stderr == (f"qemu-unit: no missing.vm or missing.xml in the search path "
                          f"{tmp_path}\n")


def test_the_units_run_imports_what_it_needs_before_create_xml_only(tmp_path: Path) -> None:
    """What `run` does without before createXML stays out of sys.modules until the runner
    loads it while createXML runs (LATE_MODULES), and the control ops' modules and
    dataclasses not even then; stderr is the journal, as in the unit."""
    import subprocess
    import sys

    lazy = ("argparse", "gettext", "json", "subprocess", "hashlib", "tempfile", "shutil",
            "systemd.journal", "qemu_unit.command", "qemu_unit.vm.status")
    code = ("import sys; from qemu_unit.cli import commands; from qemu_unit.vm import runner;"
            "assert commands.systemd_run(['--user', 'run', 'web']) is not None;"
            "commands.log.setup(); assert commands.log.journal_connected();"
            f"print(sorted(m for m in {lazy!r} if m in sys.modules));"
            "from qemu_unit.vm import image;"  # Image= VMs: qemu-img only for a new overlay
            "print('subprocess' in sys.modules);"
            "runner.load_late_modules();"
            "print(sorted(m for m in ('json', 'tempfile', 'systemd.journal', 'qemu_unit.vm.status')"
            " if m not in sys.modules));"
            "print(sorted(m for m in ('dataclasses', 'qemu_unit.vm.guest', 'qemu_unit.vm.backup',"
            " 'qemu_unit.vm.snapshot', 'qemu_unit.vm.health') if m in sys.modules))")
    with open(tmp_path / "stderr", "w") as stderr:
        st = os.fstat(stderr.fileno())
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=stderr, text=True, timeout=60,
                             env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert out.returncode == 0, (tmp_path / "stderr").read_text()
    assert out.stdout == "[]\nFalse\n[]\n[]\n"


def test_run_leaves_without_the_interpreter_teardown_but_with_its_message_and_status(
    tmp_path: Path,
) -> None:
    """`run` ends with os._exit (the stop need not wait for Python's teardown): the exit
    status and the last line still come out, buffered stdio flushed first."""
    import subprocess
    import sys

    code = ("import atexit, sys; atexit.register(lambda: print('teardown ran'));"
            "sys.stdout.write('buffered, unflushed\\n');"
            "from qemu_unit.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "run", "--config-dir", str(tmp_path),
                          "missing"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert "no missing.vm or missing.xml" in out.stderr
    assert out.stdout == "buffered, unflushed\n"  # flushed; the atexit handler never ran
