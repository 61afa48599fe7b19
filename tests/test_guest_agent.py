"""The agent protocol (vm/agent.py), exec's output loop (vm/guest.py) and the health state
(vm/health.py) against a fake qemu-ga behind libvirt_qemu.qemuAgentCommand: bounded,
malformed and hostile answers end in one line."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import libvirt
import pytest

from qemu_unit.vm import agent, guest, health
from qemu_unit.vm.control import Context, ControlError


class FakeGA:
    """qemu-ga as far as exec needs it: two output files, one program."""

    def __init__(self, out: list[bytes], err: list[bytes], exit_after: int = 2,
                 status: dict[str, Any] | None = None) -> None:
        self.files: dict[int, list[bytes]] = {}
        self.paths: dict[int, str] = {}
        self.chunks = {"out": list(out), "err": list(err)}
        self.exit_after = exit_after
        self.status = status or {"exited": True, "exitcode": 0}
        self.calls: list[dict[str, Any]] = []
        self.polls = 0
        self.position = 0
        self.written: list[tuple[int, bytes]] = []
        self.override: Callable[[dict[str, Any]], str | None] = lambda _r: None

    def __call__(self, _dom: Any, text: str, _timeout: int, _flags: int) -> str:
        request = json.loads(text)
        self.calls.append(request)
        forced = self.override(request)
        if forced is not None:
            return forced
        name, args = request["execute"], request.get("arguments", {})
        value: Any = {}
        if name == "guest-file-open":
            handle = 100 + len(self.paths)
            self.paths[handle] = args["path"]
            value = handle
        elif name == "guest-exec":
            value = {"pid": 4242}
        elif name == "guest-exec-status":
            self.polls += 1
            value = self.status if self.polls > self.exit_after else {"exited": False}
        elif name == "guest-file-write":
            data = base64.b64decode(args["buf-b64"])
            self.written.append((self.position, data))
            self.position += len(data)
            value = {"count": len(data), "eof": False}
        elif name == "guest-file-seek":
            self.position = args["offset"]
            value = {"position": self.position, "eof": False}
        elif name == "guest-file-read":
            key = "out" if self.paths[args["handle"]].endswith(".out") else "err"
            data = self.chunks[key].pop(0) if self.chunks[key] else b""
            value = {"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                     "eof": not data}
        return json.dumps({"return": value})


class Conn:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.lines.append(message)

    def client_gone(self) -> bool:
        return False

    def receive(self, timeout: float | None = None) -> None:
        return None


@pytest.fixture
def ga(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeGA]:
    import libvirt_qemu

    def make(*args: Any, **kwargs: Any) -> FakeGA:
        fake = FakeGA(*args, **kwargs)
        monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", fake)
        return fake

    monkeypatch.setattr(agent, "POLL_FIRST", 0.0001)
    return make


def _exec(argv: list[str], **request: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    conn = Conn()
    final = guest.exec_op(Context("t", domain=object), {"argv": argv, **request},
                          conn)  # type: ignore[arg-type]
    return final, conn.lines


def test_exec_streams_both_files_and_returns_the_status(ga: Callable[..., FakeGA]) -> None:
    fake = ga([b"one\n", b"two\n"], [b"oops\n"], status={"exited": True, "signal": 15})
    final, lines = _exec(["prog", "a b"], env=["A=1"])
    assert final == {"signal": 15}
    out = b"".join(base64.b64decode(x["stdout"]) for x in lines if "stdout" in x)
    err = b"".join(base64.b64decode(x["stderr"]) for x in lines if "stderr" in x)
    assert (out, err) == (b"one\ntwo\n", b"oops\n")
    spawn = next(c for c in fake.calls if c["execute"] == "guest-exec")["arguments"]
    # The files are opened before the program starts; the wrapper gets them, the env, argv.
    files = list(fake.paths.values())
    assert spawn["path"] == "/bin/sh" and spawn["arg"][3:] == [*files, "", "1", "A=1", "prog",
                                                              "a b"]
    assert [c["execute"] for c in fake.calls][-2:] == ["guest-file-close"] * 2


def test_exec_timeout_kills_the_session(ga: Callable[..., FakeGA]) -> None:
    fake = ga([b"started\n"], [], exit_after=10**9)
    kills = []

    def override(request: dict[str, Any]) -> str | None:
        args = request.get("arguments", {})
        if request["execute"] == "guest-exec" and "qemu-unit-kill" in args.get("arg", []):
            kills.append(args["arg"])
            fake.exit_after = 0  # the kill ends it
            return json.dumps({"return": {"pid": 1}})
        return None

    fake.override = override
    with pytest.raises(ControlError) as e:
        _exec(["sleep", "600"], timeout=0.05)
    assert e.value.code == "timeout" and "ran longer than 0.05s" in e.value.message
    assert kills and kills[0][-1] == "4242"


def _silent() -> libvirt.libvirtError:
    """libvirt's error when an agent answer did not come within the timeout."""
    e = libvirt.libvirtError("Guest agent is not responding: Guest agent not available for now")
    e.err = (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, 0,
             "Guest agent is not responding: Guest agent not available for now", 2, "", None,
             None, -1, -1)
    return e


def test_writes_are_small_and_retried_at_their_offset(ga: Callable[..., FakeGA]) -> None:
    # qemu-ga 7.2 never answers a request much larger than 187 KB of JSON: any amount is
    # written in WRITE_CHUNK pieces. A piece whose answer libvirt gave up on (qemu-ga may
    # have written it meanwhile) is written again after a seek back to its offset.
    fake = ga([], [])
    data = bytes(range(256)) * 1000  # 256,000 bytes: three pieces
    lost = []

    def override(request: dict[str, Any]) -> str | None:
        if request["execute"] == "guest-file-write" and fake.position and not lost:
            lost.append(1)
            fake(None, json.dumps(request), 0, 0)  # it was written, the answer is lost
            raise _silent()
        return None

    fake.override = override
    agent.Agent(object()).write_all(7, 0, data)
    sizes = [len(json.dumps(c)) for c in fake.calls if c["execute"] == "guest-file-write"]
    assert max(sizes) < 140 * 1024
    assert [c["arguments"] for c in fake.calls if c["execute"] == "guest-file-seek"] == [
        {"handle": 7, "offset": agent.WRITE_CHUNK, "whence": "set"}]
    image = bytearray()
    for offset, piece in fake.written:
        image[offset:offset + len(piece)] = piece
    assert bytes(image) == data


def test_an_agent_that_stays_silent_ends_in_one_line(ga: Callable[..., FakeGA]) -> None:
    fake = ga([], [])

    def override(request: dict[str, Any]) -> str | None:
        if request["execute"] == "guest-file-read":
            raise _silent()
        return None

    fake.override = override
    with pytest.raises(ControlError) as e:
        agent.Agent(object()).read_at(7, 4096)
    assert e.value.code == "agent-silent" and "\n" not in e.value.message
    assert [c["execute"] for c in fake.calls].count("guest-file-read") == agent.ATTEMPTS


def test_exec_large_stdin_goes_through_a_file(ga: Callable[..., FakeGA]) -> None:
    fake = ga([], [])
    stdin = b"x" * (3 * agent.WRITE_CHUNK)

    class Feeder(Conn):
        def __init__(self) -> None:
            super().__init__()
            self.pending = [{"data": base64.b64encode(stdin).decode()}, {"eof": True}]

        def receive(self, timeout: float | None = None) -> Any:
            return self.pending.pop(0) if self.pending else None

    guest.exec_op(Context("t", domain=object), {"argv": ["wc", "-c"], "stdin": True},
                  Feeder())  # type: ignore[arg-type]
    spawn = next(c for c in fake.calls if c["execute"] == "guest-exec")["arguments"]
    infile = spawn["arg"][5]
    assert infile.endswith(".in") and "input-data" not in spawn
    assert b"".join(piece for _offset, piece in fake.written) == stdin
    assert max(len(json.dumps(c)) for c in fake.calls) < 140 * 1024


@pytest.mark.parametrize(("reply", "text"), [
    ("x" * (agent.MAX_REPLY + 10000), "larger than"),
    ("not json", "not JSON"),
    ('{"error": {"class": "GenericError", "desc": "no\\nway"}}', "guest-file-read: no"),
    ('{"neither": 1}', "malformed"),
    ('{"return": {"count": 3, "buf-b64": "!!!", "eof": false}}', "does not decode"),
    ('{"return": {"count": 3, "buf-b64": "' + "A" * 4000 + '", "eof": false}}', "more or"),
    ('{"return": "no object"}', "malformed"),
])
def test_hostile_file_reads_end_in_one_line(ga: Callable[..., FakeGA], reply: str,
                                            text: str) -> None:
    fake = ga([], [])
    fake.override = lambda r: reply if r["execute"] == "guest-file-read" else None
    with pytest.raises(ControlError) as e:
        agent.Agent(object()).read(1, 1024)
    assert text in e.value.message and "\n" not in e.value.message


def test_exec_status_bounds_and_signals() -> None:
    status = agent.ExecStatus.from_reply({"exited": True, "signal": 9})
    assert status.status == 137
    big = base64.b64encode(b"x" * (agent.MAX_OUTPUT + 5)).decode()
    status = agent.ExecStatus.from_reply({"exited": True, "exitcode": 1, "out-data": big})
    assert len(status.stdout) == agent.MAX_OUTPUT and status.truncated
    for bad in ({"exitcode": "0"}, {"exitcode": -1}, {"signal": 1 << 40}):
        with pytest.raises(ControlError):
            agent.ExecStatus.from_reply({"exited": True, **bad})


def test_no_domain_is_not_running() -> None:
    with pytest.raises(ControlError) as e:
        agent.Agent(None)
    assert e.value.code == "not-running"


def _r(ok: bool) -> health.Result:
    return health.Result(ok, 0 if ok else 1, "out")


def test_health_follows_podmans_rules() -> None:
    h = health.Health()
    # Failures in the start period do not count; a pass ends it.
    h = health.advance(h, _r(False), True, 2, 0)
    assert (h.status, h.failing_streak) == ("starting", 0)
    h = health.advance(h, _r(True), True, 2, 0)
    assert (h.status, h.failing_streak) == ("healthy", 0)
    # After a pass, failures count even within the period; RETRIES in a row: unhealthy.
    h = health.advance(h, _r(False), True, 2, 0)
    assert (h.status, h.failing_streak) == ("healthy", 1)
    h = health.advance(h, _r(False), False, 2, 0)
    assert (h.status, h.failing_streak) == ("unhealthy", 2)
    h = health.advance(h, _r(True), False, 2, 5)
    assert (h.status, h.failing_streak, h.checks, h.last_check) == ("healthy", 0, 5, 5)


def test_health_output_is_one_bounded_line() -> None:
    line = health.one_line("a\nb\t" + "x" * 2000)
    assert "\n" not in line and len(line) == health.MAX_OUTPUT and line.startswith("a b x")
