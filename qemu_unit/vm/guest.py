"""Control ops that reach inside the guest through its agent: exec and cp.

exec: qemu-ga's guest-exec captures output only up to 16 MiB and hands it over only
when the program has ended. To stream any amount as it comes, the program's stdout
and stderr go to two files in the guest's /tmp instead, which the runner opened for
reading (guest-file-open "a+" creates them) *before* the program starts; the program's
shell unlinks them at once, so nothing is left in the guest whatever happens, and the
runner reads both with guest-file-read while guest-exec-status says it runs. The
program runs in a session of its own (setsid) so that --timeout can kill its group.
stdin, when given, is read whole first (at most MAX_STDIN): qemu-ga's input-data when
small, else a file in /tmp written in pieces that the program's shell unlinks at once.

cp: `stat` (type, mode, size), `pull` (guest-file-read in CHUNK pieces, each sent as
an intermediate line), `push` (lines of data from the client written in WRITE_CHUNK
pieces to a temporary name next to the target, then chmod and mv: a partial copy never
has the final name), `list` (a directory tree, for -r) and `mkdir`. A file read or write
whose answer libvirt gave up on is retried at the same offset (Agent.read_at/write_all).
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import secrets
import time
from typing import Any

from qemu_unit.vm.agent import CHUNK, POLL_FIRST, POLL_MAX, WRITE_CHUNK, Agent
from qemu_unit.vm.control import Connection, Context, ControlError, handler

# stdin handed to the guest program at most (qemu-ga takes it as one base64 string).
MAX_STDIN = 16 * 1024 * 1024
# Output files are read in pieces of this size while the program runs.
EXEC_CHUNK = CHUNK
# How long the runner waits for a killed program's end before giving up on it.
KILL_WAIT = 10.0
# The exec wrapper: $1/$2 the output files, $3 a file for stdin (or ""), $4 how many
# NAME=VALUE follow.
EXEC_SCRIPT = (
    'o=$1 e=$2 i=$3 n=$4; shift 4; '
    'while [ "$n" -gt 0 ]; do export "$1"; shift; n=$((n-1)); done; '
    'if [ -n "$i" ]; then exec <"$i"; rm -f -- "$i"; fi; '
    'exec >>"$o" 2>>"$e"; rm -f -- "$o" "$e"; '
    'if command -v setsid >/dev/null 2>&1; then exec setsid -- "$@"; fi; exec "$@"'
)


# Seconds for one agent command here: a 1 MiB piece through virtio-serial and qemu-ga's
# JSON parser takes seconds on a loaded TCG host.
FILE_TIMEOUT = 60


def _agent(ctx: Context) -> Agent:
    return Agent(ctx.domain(), timeout=FILE_TIMEOUT)


def _text_list(request: dict[str, Any], key: str) -> list[str]:
    value = request.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v
                                              for v in value):
        raise ControlError(f"{key}: expected a list of strings", "protocol")
    return value


def _path(request: dict[str, Any]) -> str:
    path = request.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ControlError("the guest path must be absolute", "usage")
    return path


def _read_stdin(conn: Connection) -> bytes:
    data = bytearray()
    while (line := conn.receive()) is not None and not line.get("eof"):
        data += _b64(line.get("data"))
        if len(data) > MAX_STDIN:
            raise ControlError(f"stdin for the guest is larger than {MAX_STDIN} bytes "
                               "(use cp for files)", "usage")
    return bytes(data)


def _b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ControlError("data: expected base64", "protocol")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("data: invalid base64", "protocol") from None


@handler("exec")
def exec_op(ctx: Context, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """{"op": "exec", "argv": [...], "env": ["K=V"], "user": U, "timeout": S, "stdin": bool}
    -> lines {"stdout": b64} / {"stderr": b64}, then {"exitcode": N} or {"signal": N}."""
    argv = _text_list(request, "argv")
    env = _text_list(request, "env")
    if not argv:
        raise ControlError("no command given", "usage")
    if any("=" not in e or e.startswith("=") for e in env):
        raise ControlError("env: expected NAME=VALUE", "usage")
    user = request.get("user")
    if user is not None:
        if not isinstance(user, str) or not user or user.startswith("-"):
            raise ControlError("user: expected a user name", "usage")
        # qemu-ga 7.2's guest-exec has no user field: runuser (util-linux) switches.
        argv = ["runuser", "-u", user, "--", *argv]
    timeout = request.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ControlError("timeout: expected seconds > 0", "usage")
    stdin = _read_stdin(conn) if request.get("stdin") else None
    agent = _agent(ctx)
    tag = secrets.token_hex(12)
    paths = [f"/tmp/.qemu-unit-exec-{tag}.out", f"/tmp/.qemu-unit-exec-{tag}.err"]
    # qemu-ga takes input-data in the one guest-exec request, whose size is bounded
    # (agent.WRITE_CHUNK): more stdin goes through a file written in pieces first.
    infile = f"/tmp/.qemu-unit-exec-{tag}.in" if stdin and len(stdin) > WRITE_CHUNK else ""
    handles: list[int] = []
    started = False
    try:
        if infile:
            handle = agent.open(infile, "w")
            try:
                agent.write_all(handle, 0, stdin or b"")
            finally:
                agent.close(handle)
            stdin = None
        for path in paths:
            handles.append(agent.open(path, "a+"))
        pid = agent.spawn(
            ["/bin/sh", "-c", EXEC_SCRIPT, "qemu-unit-exec", *paths, infile, str(len(env)), *env,
             *argv],
            stdin=stdin,
        )
        started = True
        try:
            return _follow(agent, conn, pid, handles, timeout)
        except OSError:
            agent.kill(pid)  # the client went away while we wrote to it
            raise
    finally:
        for handle in handles:
            try:
                agent.close(handle)
            except ControlError:
                pass
        if not started:
            # The program's shell never ran, so it did not remove the files.
            try:
                agent.run(["/bin/rm", "-f", "--", *paths, *filter(None, [infile])],
                          timeout=10)
            except ControlError:
                pass


def _follow(agent: Agent, conn: Connection, pid: int, handles: list[int],
            timeout: float | None) -> dict[str, Any]:
    """Send the program's output as it comes until it ends; its exit status."""
    deadline = time.monotonic() + timeout if timeout else None
    killed_at: float | None = None
    why = ""
    pause = POLL_FIRST
    result = None
    at_end = [False, False]
    while True:
        if result is None:
            result = agent.status(pid)
        got = False
        for i, (handle, key) in enumerate(zip(handles, ("stdout", "stderr"), strict=True)):
            if at_end[i]:
                agent.seek(handle)  # glibc's EOF is sticky: clear it, the file grows
            data, at_end[i] = agent.read(handle, EXEC_CHUNK)
            if data:
                got = True
                conn.send({key: base64.b64encode(data).decode()})
        if result is not None:
            if not got:
                break  # ended, and both files read to their end
            continue
        now = time.monotonic()
        if killed_at is None:
            if deadline is not None and now >= deadline:
                why = f"the command ran longer than {timeout:g}s: killed"
            elif conn.client_gone():
                why = "the client went away"
            if why:
                agent.kill(pid)
                killed_at = now
        elif now - killed_at > KILL_WAIT:
            raise ControlError(f"{why}, but it did not end within {KILL_WAIT:g}s", "timeout")
        if not got:
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
        else:
            pause = POLL_FIRST
    if why:
        raise ControlError(why, "timeout")
    if result.signal is not None:
        return {"signal": result.signal}
    return {"exitcode": result.exitcode}


# -- cp ---------------------------------------------------------------------------------------

STAT_SCRIPT = 'stat -L -c "%F|%a|%s" -- "$1"'


def stat(agent: Agent, path: str) -> dict[str, Any] | None:
    """{"type": "file"|"directory"|"other", "mode": int, "size": int}; None: no such path."""
    result = agent.run(["/bin/sh", "-c", STAT_SCRIPT, "qemu-unit-stat", path])
    if result.status != 0:
        message = result.message()
        if "No such file" in message or "Not a directory" in message:
            return None
        raise ControlError(f"{path}: {message}", "agent-error")
    try:
        kind, mode, size = result.stdout.decode().strip().split("|")
        return {
            "type": {"regular file": "file", "regular empty file": "file",
                     "directory": "directory"}.get(kind, "other"),
            "mode": int(mode, 8), "size": int(size),
        }
    except ValueError:
        raise ControlError(f"{path}: stat in the guest answered {result.stdout[:80]!r}",
                           "protocol") from None


@handler("stat")
def stat_op(ctx: Context, request: dict[str, Any], _conn: Connection) -> dict[str, Any]:
    found = stat(_agent(ctx), _path(request))
    return {"exists": False} if found is None else {"exists": True, **found}


@handler("pull")
def pull_op(ctx: Context, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """A guest file to the client: lines {"data": b64}, then {"mode": M, "size": N}."""
    path = _path(request)
    agent = _agent(ctx)
    found = stat(agent, path)
    if found is None:
        raise ControlError(f"{path}: no such file or directory in the guest", "missing")
    if found["type"] != "file":
        raise ControlError(f"{path}: not a regular file in the guest (a directory needs -r)",
                           "usage")
    handle = agent.open(path, "r")
    size = 0
    try:
        while True:
            data, eof = agent.read_at(handle, size, CHUNK)
            if data:
                size += len(data)
                conn.send({"data": base64.b64encode(data).decode()})
            if eof or not data:
                break
    finally:
        agent.close(handle)
    return {"mode": found["mode"], "size": size}


@handler("push")
def push_op(ctx: Context, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
    """Client data to a guest file: {"op": "push", "path": P, "mode": M}, then lines
    {"data": b64} and {"end": true}. Written under a temporary name, renamed at the end."""
    path = _path(request)
    mode = request.get("mode", 0o644)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ControlError("mode: expected a permission number", "usage")
    agent = _agent(ctx)
    head, tail = posixpath.split(path)
    temp = posixpath.join(head, f".{tail}.qemu-unit-{secrets.token_hex(6)}")
    handle = agent.open(temp, "w")
    size = 0
    complete = False
    try:
        try:
            while (line := conn.receive()) is not None:
                if line.get("end"):
                    complete = True
                    break
                data = _b64(line.get("data"))
                agent.write_all(handle, size, data)
                size += len(data)
        finally:
            agent.close(handle)
        if not complete:
            raise ControlError("the client stopped before the end of the file", "protocol")
        result = agent.run(["/bin/sh", "-c", 'chmod "$1" -- "$2" && mv -f -- "$2" "$3"',
                            "qemu-unit-push", f"{mode:o}", temp, path])
        if result.status != 0:
            raise ControlError(f"{path}: {result.message()}", "agent-error")
        temp = ""
    finally:
        if temp:
            try:
                agent.run(["/bin/rm", "-f", "--", temp], timeout=10)
            except ControlError:
                pass
    return {"size": size}


# Each entry: type (d, f, l, ...), octal mode, path relative to the top, NUL-terminated.
LIST_SCRIPT = 'cd -- "$1" && find . -mindepth 1 -printf "%y %m %P\\0"'
# The listing kept (the agent's whole reply is bounded by agent.MAX_REPLY anyway).
MAX_LIST = 2 * 1024 * 1024


@handler("list")
def list_op(ctx: Context, request: dict[str, Any], _conn: Connection) -> dict[str, Any]:
    """A guest directory tree: {"entries": [[type, mode, relative path], ...]}."""
    path = _path(request)
    agent = _agent(ctx)
    result = agent.run(["/bin/sh", "-c", LIST_SCRIPT, "qemu-unit-list", path], timeout=60,
                       keep=MAX_LIST)
    if result.status != 0:
        raise ControlError(f"{path}: {result.message()}", "missing")
    if result.truncated:
        raise ControlError(f"{path}: the directory listing is larger than qemu-unit takes",
                           "usage")
    entries = []
    for item in result.stdout.split(b"\0"):
        if not item:
            continue
        kind, mode, rel = item.decode(errors="surrogateescape").split(" ", 2)
        entries.append([kind, int(mode, 8), rel])
    return {"entries": entries}


@handler("mkdir")
def mkdir_op(ctx: Context, request: dict[str, Any], _conn: Connection) -> dict[str, Any]:
    path = _path(request)
    mode = request.get("mode", 0o755)
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ControlError("mode: expected a permission number", "usage")
    result = _agent(ctx).run(["/bin/sh", "-c", 'mkdir -p -- "$2" && chmod "$1" -- "$2"',
                              "qemu-unit-mkdir", f"{mode:o}", path])
    if result.status != 0:
        raise ControlError(f"{path}: {result.message()}", "agent-error")
    return {}
