"""The runner's control socket (vm/control.py) against its client (cli/control.py),
on a real UNIX socket in a temporary runtime directory."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemu_unit.cli import control as client
from qemu_unit.vm import control

NAME = "ctltest"


@control.handler("test-stream")
def _stream(_ctx: control.Context, request: dict[str, Any],
            conn: control.Connection) -> dict[str, Any]:
    for i in range(request.get("n", 3)):
        conn.send({"line": i})
    return {"done": True}


@control.handler("test-echo")
def _echo(_ctx: control.Context, _request: dict[str, Any],
          conn: control.Connection) -> dict[str, Any]:
    got = []
    while (line := conn.receive(timeout=5)) is not None and not line.get("end"):
        got.append(line["data"])
    return {"got": got}


@control.handler("test-fail")
def _fail(_ctx: control.Context, request: dict[str, Any],
          _conn: control.Connection) -> dict[str, Any]:
    if request.get("bug"):
        raise RuntimeError("a bug")
    raise control.ControlError("no agent here\nsecond line", "no-agent")


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[control.Server]:
    root = tmp_path / "r"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(root))
    srv = control.Server(root / "control.sock", control.Context(NAME, domain=lambda: object()))
    srv.listen()
    yield srv
    srv.close()
    assert not (root / "control.sock").exists()


def test_ping(server: control.Server) -> None:
    answer = client.call(NAME, {"op": "ping"})
    assert answer["ok"] is True and answer["name"] == NAME and answer["running"] is True


def test_streaming_reply_then_final_line(server: control.Server) -> None:
    lines: list[dict[str, Any]] = []
    answer = client.call(NAME, {"op": "test-stream", "n": 5}, lines.append)
    assert lines == [{"line": i} for i in range(5)]
    assert answer == {"ok": True, "done": True}


def test_handler_reads_further_lines(server: control.Server) -> None:
    with client.session(NAME) as s:
        s.send({"op": "test-echo"})
        for word in ("a", "b"):
            s.send({"data": word})
        s.send({"end": True})
        assert s.finish()["got"] == ["a", "b"]


def test_errors_have_one_line_and_their_exit_status(server: control.Server) -> None:
    with pytest.raises(client.ControlFailed) as e:
        client.call(NAME, {"op": "test-fail"})
    assert str(e.value) == "no agent here" and e.value.exit_status == client.EXIT_NO_AGENT
    with pytest.raises(client.ControlFailed) as e:
        client.call(NAME, {"op": "nonsense"})
    assert "unknown op 'nonsense'" in str(e.value) and e.value.exit_status == client.EXIT_FAILED
    with pytest.raises(client.ControlFailed) as e:
        client.call(NAME, {"op": "test-fail", "bug": True})
    assert "internal error: a bug" in str(e.value)
    # The server still serves after a handler's bug.
    assert client.call(NAME, {"op": "ping"})["ok"] is True


def _raw(server: control.Server, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = s.makefile("rb").readline()
    value = json.loads(reply)
    assert isinstance(value, dict)
    return value


def test_bounded_and_malformed_requests(server: control.Server) -> None:
    huge = b'{"op": "ping", "x": "' + b"a" * (control.MAX_LINE + 10) + b'"}\n'
    assert _raw(server, huge)["code"] == "protocol"
    assert _raw(server, b"not json\n")["code"] == "protocol"
    assert _raw(server, b"[1, 2]\n")["code"] == "protocol"
    assert _raw(server, b'{"op": "ping"')["code"] == "protocol"  # no newline before EOF


def test_peer_not_allowed_is_refused(server: control.Server) -> None:
    server.allowed_uids = {424242}
    with pytest.raises(client.ControlFailed) as e:
        client.call(NAME, {"op": "ping"})
    assert e.value.exit_status == client.EXIT_DENIED


def test_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    with pytest.raises(client.ControlFailed) as e:
        client.call(NAME, {"op": "ping"})
    assert e.value.exit_status == client.EXIT_NOT_RUNNING
    assert str(e.value).startswith(f"VM {NAME} is not running")
    # A socket left behind by a runner that died: nobody listens.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()
    with pytest.raises(client.ControlFailed) as e:
        client.call(NAME, {"op": "ping"})
    assert e.value.exit_status == client.EXIT_NOT_RUNNING


def test_the_first_request_for_an_op_loads_its_module() -> None:
    """A fresh runner has none of the op modules (their CPU and memory are not every VM's);
    a request for one of their ops, on the control socket's thread, imports it and is
    answered by its handler, not refused as unknown."""
    import subprocess
    import sys

    code = (
        "import sys, threading; from qemu_unit.cli import commands;"
        "from qemu_unit.vm import runner, control;"
        "owners = sorted(set(control.OWNERS.values()) - {'qemu_unit.vm.saved'});"
        "runner.load_late_modules();"
        "print(sorted(m for m in owners if m in sys.modules), 'dataclasses' in sys.modules);"
        "t = threading.Thread(target=lambda: print(control.find_handler('snapshot-create')"
        " is control.HANDLERS['snapshot-create'])); t.start(); t.join();"
        "print('qemu_unit.vm.snapshot' in sys.modules, 'qemu_unit.vm.guest' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["[] False", "True", "True False"]


def test_the_owners_table_names_the_module_of_every_op() -> None:
    import importlib

    for module in set(control.OWNERS.values()):
        importlib.import_module(module)
    owned = {op: h.__module__ for op, h in control.HANDLERS.items() if op != "ping"
             and not op.startswith("test-")}
    assert owned == control.OWNERS


def test_a_request_for_an_op_is_answered_by_the_module_it_loads(
    server: control.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the socket: the op's module is imported on the server's thread, then serves."""
    import sys
    import types

    module = types.ModuleType("qemu_unit_test_late_op")

    def load(name: str) -> types.ModuleType:
        assert name == module.__name__
        control.handler("test-late")(lambda *_: {"late": True})
        sys.modules[name] = module
        return module

    monkeypatch.setitem(control.OWNERS, "test-late", module.__name__)
    monkeypatch.setattr(control.importlib, "import_module", load)
    try:
        assert client.call(NAME, {"op": "test-late"}) == {"ok": True, "late": True}
    finally:
        control.HANDLERS.pop("test-late", None)
        sys.modules.pop(module.__name__, None)


def test_an_op_is_registered_once() -> None:
    with pytest.raises(ValueError):
        control.handler("ping")(lambda *_: None)


def test_a_user_without_a_runtime_directory_still_finds_the_system_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `qemu-unit console NAME` as another user (no $XDG_RUNTIME_DIR, e.g. under setpriv):
    # the system VM's socket is looked for first; no private runtime directory is no error.
    from qemu_unit import paths

    monkeypatch.setattr(paths, "SYSTEM_RUNTIME", tmp_path)
    monkeypatch.setattr(paths.os, "geteuid", lambda: 65534)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / paths.ATTACH_SOCKET).touch()
    assert client.find_socket("web", "attach_socket") == tmp_path / "web" / paths.ATTACH_SOCKET
    with pytest.raises(client.ControlFailed, match="not running") as info:
        client.find_socket("other", "attach_socket")
    assert info.value.code == "not-running"
