"""Downloading one URL into a partial file that survives failures: HTTP Range resumes it.

requests does the HTTP (Debian's python3-requests); file:// URLs are read directly.
Server errors (5xx), dropped connections and timeouts are retried with exponential
backoff, each retry resuming where the file ends (`Range: bytes=N-`, with
`If-Range:` the validator of the first response, so a changed file restarts
instead of being spliced); a 4xx is final. The bytes go to a `Sink`, which
decides what is kept (see pull.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from qemu_unit.errors import QemuUnitError

CHUNK = 1 << 20
SMALL_LIMIT = 16 << 20  # a sums file or a signature: read into memory
USER_AGENT = "qemu-unit"


class FetchError(QemuUnitError):
    """The server or the network did not deliver, retries included."""


@dataclass(frozen=True)
class Retry:
    attempts: int = 6  # in all, the first one included
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_backoff: float = 30.0
    timeout: float = 30.0  # connect and between two reads

    def delay(self, attempt: int) -> float:
        return float(min(self.backoff * 2**attempt, self.max_backoff))


DEFAULT_RETRY = Retry()


class Sink(Protocol):
    def restart(self) -> None: ...  # the server sends from byte 0: forget what was fed
    def feed(self, data: bytes) -> None: ...


Progress = Callable[[int, int | None], None]


class _Permanent(Exception):
    """A failure that a retry cannot fix."""


def _session() -> Any:
    import requests  # here: the generator and the runner never need it

    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    # No automatic decoding: a .gz is served as what it is, whatever Content-Encoding says.
    return session


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"{url}: a file:// URL names a local file (file:///PATH)")
    return Path(unquote(parts.path))


def fetch_small(url: str, retry: Retry = DEFAULT_RETRY) -> bytes:
    """The whole (small) document at URL: a sums file or a signature."""
    if url.startswith("file://"):
        path = _file_path(url)
        try:
            with open(path, "rb") as f:
                return f.read(SMALL_LIMIT + 1)[:SMALL_LIMIT]
        except OSError as e:
            raise FetchError(f"{url}: {e.strerror}") from None
    import requests

    session = _session()
    for attempt in range(retry.attempts):
        try:
            resp = session.get(url, timeout=retry.timeout)
            if resp.status_code >= 500:
                raise requests.HTTPError(f"{resp.status_code} {resp.reason}")
            if resp.status_code >= 400:
                raise FetchError(f"{url}: {resp.status_code} {resp.reason}")
            if len(resp.content) > SMALL_LIMIT:
                raise FetchError(f"{url}: larger than {SMALL_LIMIT} bytes")
            return bytes(resp.content)
        except requests.RequestException as e:
            if attempt + 1 == retry.attempts:
                raise FetchError(f"{url}: {_reason(e)} ({retry.attempts} attempts)") from None
            time.sleep(retry.delay(attempt))
    raise AssertionError("unreachable")


def _reason(e: BaseException) -> str:
    text = str(e)
    # requests nests urllib3's reasons: the last one is the useful one.
    return text.rsplit(": ", 1)[-1].rstrip(")'\"") if len(text) > 120 else text


def download(url: str, part: Path, sink: Sink, progress: Progress,
             retry: Retry = DEFAULT_RETRY) -> int:
    """Append URL's bytes to PART (resuming what PART holds) and feed them to SINK;
    the total size. PART stays on a failure so that the next pull resumes."""
    if url.startswith("file://"):
        return _copy_file(_file_path(url), part, sink, progress)
    import requests

    session = _session()
    meta = part.with_name(part.name + ".json")
    last_error = ""
    for attempt in range(retry.attempts):
        if attempt:
            time.sleep(retry.delay(attempt - 1))
        try:
            return _download_once(session, url, part, meta, sink, progress, retry)
        except _Permanent as e:
            raise FetchError(f"{url}: {e}") from None
        except (requests.RequestException, _Retryable) as e:
            last_error = _reason(e)
    size = part.stat().st_size if part.exists() else 0
    raise FetchError(f"{url}: {last_error} ({retry.attempts} attempts; {size} bytes kept "
                     "to resume from)")


class _Retryable(Exception):
    pass


def _download_once(session: Any, url: str, part: Path, meta: Path, sink: Sink,
                   progress: Progress, retry: Retry) -> int:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    validator = _read_meta(meta).get("validator") if have else None
    if have and validator:
        headers |= {"Range": f"bytes={have}-", "If-Range": validator}
    elif have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=retry.timeout) as resp:
        if resp.status_code == 416 and have:
            # What we hold does not fit the file (it shrank): start again.
            part.unlink()
            raise _Retryable("416 Range Not Satisfiable")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retryable(f"{resp.status_code} {resp.reason}")
        if resp.status_code >= 400:
            raise _Permanent(f"{resp.status_code} {resp.reason}")
        if resp.status_code == 206:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != have:
                raise _Permanent(f"asked for bytes from {have}, got a range from {start}")
            total = _content_range_total(resp.headers.get("Content-Range", ""))
        else:
            # 200: the whole file (no Range support, or it changed since): from the start.
            have = 0
            sink.restart()
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if resp.status_code != 206:
            meta.write_text(json.dumps({"validator": new_validator}))
        mode = "ab" if resp.status_code == 206 else "wb"
        with open(part, mode) as f:
            progress(have, total)
            for chunk in resp.iter_content(CHUNK):
                f.write(chunk)
                sink.feed(chunk)
                have += len(chunk)
                progress(have, total)
        if total is not None and have < total:
            raise _Retryable(f"connection closed after {have} of {total} bytes")
    return have


def _content_range_start(value: str) -> int | None:
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str) -> int | None:
    total = value.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _read_meta(meta: Path) -> dict[str, Any]:
    try:
        value = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _copy_file(path: Path, part: Path, sink: Sink, progress: Progress) -> int:
    try:
        src = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise FetchError(f"file://{path}: {e.strerror}") from None
    with src, open(part, "wb") as out:
        total = os.fstat(src.fileno()).st_size
        done = 0
        sink.restart()
        while chunk := src.read(CHUNK):
            out.write(chunk)
            sink.feed(chunk)
            done += len(chunk)
            progress(done, total)
    return done
