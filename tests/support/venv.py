"""The package as a pip user installs it, for tests that run it as a service.

The default python3 here is a pyenv build a service user cannot execute, so
the venv is made from Debian's /usr/bin/python3 with the system site packages
(python3-libvirt, python3-systemd) and lives outside /tmp, where the container
sees it through the overlay's lower layer.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Not /var/tmp: the unit has PrivateTmp=yes. QEMU_UNIT_TEST_VENV: a private one per runner.
VENV_DIR = Path(os.environ.get("QEMU_UNIT_TEST_VENV", "/var/lib/qemu-unit-tests/venv"))
SYSTEM_PYTHON = "/usr/bin/python3"


def _run(cmd: list[str]) -> None:
    # umask 022: a non-root service user must be able to read and run everything
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          preexec_fn=lambda: os.umask(0o022),
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                               "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")


def _make_readable(top: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames + ["."]:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            mode = path.stat().st_mode & 0o7777
            # everyone may read; whoever may execute, everyone may
            wanted = mode | 0o444 | (0o111 if mode & 0o111 or path.is_dir() else 0)
            if wanted != mode:
                path.chmod(wanted)


def _tree_digest(top: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in top.rglob("*") if not p.is_dir()):
        h.update(str(path.relative_to(top)).encode() + b"\0")
        h.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return h.hexdigest()


@functools.cache
def test_install() -> Path:
    """Install this tree into the shared test venv if it changed; return bin/qemu-unit."""
    VENV_DIR.parent.mkdir(parents=True, exist_ok=True)
    VENV_DIR.parent.chmod(0o755)
    with open(VENV_DIR.parent / ".venv.lock", "a") as lock:
        # parallel test sessions share the venv: one installs at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = VENV_DIR / "bin/python"
        if not python.exists():
            _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(VENV_DIR)])
        # setuptools builds in the source tree (build/, *.egg-info): build a copy instead
        with tempfile.TemporaryDirectory(dir=VENV_DIR.parent) as tmp:
            src = Path(tmp, "src")
            shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
                ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests"))
            # Other sessions' containers may be running the venv: reinstall only
            # when the tree changed, so that an unchanged tree is never half-installed.
            digest = _tree_digest(src)
            stamp = VENV_DIR / ".installed-tree"
            if not stamp.exists() or stamp.read_text() != digest:
                stamp.unlink(missing_ok=True)
                _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                      "--no-build-isolation", "--force-reinstall", str(src)])
                stamp.write_text(digest)
        _make_readable(VENV_DIR)
    script = VENV_DIR / "bin/qemu-unit"
    if not script.is_file():
        raise RuntimeError(f"pip installed no {script}")
    return script


test_install.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test
