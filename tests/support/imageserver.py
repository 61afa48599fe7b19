"""A loopback HTTP server for image pulls: Range requests, counters and injected faults.

    with ImageServer() as srv:
        srv.files["/img.qcow2"] = data
        srv.drop_after["/img.qcow2"] = 4096   # the next response stops after 4 KiB
        srv.fail["/img.qcow2"] = 2            # the next two requests get 503
        url = srv.url("/img.qcow2")

Files may also be paths on disk (served in chunks, for big images). Binds
127.0.0.1 only (or the address given); nothing leaves the machine.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class ImageServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.files: dict[str, bytes | Path] = {}
        self.drop_after: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.ranges = True
        self.chunk_delay = 0.0  # seconds between 1 MiB chunks: a slow line, a pull in flight
        self.requests: collections.Counter[str] = collections.Counter()
        self.range_requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server._serve(self)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self.lock:
            self.requests[path] += 1
            if h.headers.get("Range"):
                self.range_requests.append((path, h.headers["Range"]))
            failing = self.fail.get(path, 0)
            if failing:
                self.fail[path] = failing - 1
            drop = self.drop_after.pop(path, None)
        if failing:
            self._send_error(h, 503)
            return
        content = self.files.get(path)
        if content is None:
            self._send_error(h, 404)
            return
        size = content.stat().st_size if isinstance(content, Path) else len(content)
        etag = f'"{size}-{_tag(content)}"'
        start, status = 0, 200
        range_header = h.headers.get("Range", "")
        if_range = h.headers.get("If-Range")
        if self.ranges and range_header.startswith("bytes=") and if_range in (None, etag):
            first = range_header[6:].split("-")[0]
            start = int(first)
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        h.send_response(status)
        h.send_header("Content-Length", str(size - start))
        h.send_header("ETag", etag)
        if self.ranges:
            h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        limit = size if drop is None else min(size, start + drop)
        try:
            for chunk in _chunks(content, start, limit):
                h.wfile.write(chunk)
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
        except (BrokenPipeError, ConnectionResetError):
            return
        if drop is not None:
            h.close_connection = True
            # A hard close mid-body: what a dropped connection looks like to the client.
            h.wfile.flush()
            h.connection.shutdown(2)

    @staticmethod
    def _send_error(h: BaseHTTPRequestHandler, code: int) -> None:
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()


def _tag(content: bytes | Path) -> str:
    if isinstance(content, Path):
        st = content.stat()
        return f"{st.st_ino}-{st.st_mtime_ns}"
    return hashlib.sha256(content).hexdigest()[:16]


def _chunks(content: bytes | Path, start: int, end: int, size: int = 1 << 20) -> Any:
    if isinstance(content, bytes):
        for pos in range(start, end, size):
            yield content[pos:min(pos + size, end)]
        return
    with open(content, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            chunk = f.read(min(size, end - pos))
            if not chunk:
                return
            pos += len(chunk)
            yield chunk


def sums_line(data: bytes, name: str, algorithm: str = "sha256") -> str:
    return f"{hashlib.new(algorithm, data).hexdigest()}  {name}\n"


# gpg as a publisher runs it: no prompt, no passphrase.
GPG = ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]


@contextlib.contextmanager
def signing_key(home: Path) -> Iterator[dict[str, str]]:
    """A throwaway GnuPG home at HOME holding one signing key: the environment to run GPG
    in. gpg starts an agent there, which would outlive the test run: stopped on the way out."""
    home.mkdir(exist_ok=True)
    home.chmod(0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        subprocess.run([*GPG, "--quick-gen-key", "qemu-unit test <test@localhost>", "ed25519",
                        "sign", "never"], env=env, check=True, capture_output=True)
        yield env
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, check=False)
