"""systemd credentials for the guest, by QEMU fw_cfg files.

systemd in the guest imports each fw_cfg file `opt/io.systemd.credentials/ID`
into /run/credentials/@system/ID. libvirt's `<sysinfo type='fwcfg'>` with
`file=` makes QEMU read the value from a file: only the path is on QEMU's
command line (SMBIOS type 11 strings would put the value there, readable by
every host user in /proc/PID/cmdline).

SetCredential= values are written to files only the VM's user can read, in
the embed root; QEMU reads them when it starts, so the runner removes
them right after the start (and again on the way out, whatever happened).
LoadCredential= files are handed to QEMU where they are.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from qemu_unit.config.settings import VMConfig
from qemu_unit.errors import ConfigError
from qemu_unit.paths import CREDENTIALS_DIR as DIRECTORY


def planned_files(vm: VMConfig, root: Path) -> list[tuple[str, Path]]:
    """(ID, file QEMU reads) of each credential; writes nothing (for render)."""
    unit_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    files = []
    for cred in vm.credentials:
        if cred.value is not None:
            path = root / DIRECTORY / cred.id
        elif cred.path is not None:
            path = cred.path
        else:
            path = Path(unit_dir or "$CREDENTIALS_DIRECTORY") / cred.id
        files.append((cred.id, path))
    return files


def write_files(vm: VMConfig, files: Sequence[tuple[str, Path]], root: Path) -> None:
    """Write the SetCredential= files (mode 0600) where FILES (the plan's credentials,
    planned_files()) say, and check the others."""
    directory = root / DIRECTORY
    remove(root)
    for cred, (_, path) in zip(vm.credentials, files, strict=True):
        entry = cred.entry
        if cred.value is not None:
            directory.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(cred.value)
        elif cred.path is None and "CREDENTIALS_DIRECTORY" not in os.environ:
            raise ConfigError(f"the unit has no credential {cred.id!r}: give it one with "
                              f"LoadCredential={cred.id}:PATH in [Service]", entry=entry)
        elif not os.access(path, os.R_OK) or not path.is_file():
            problem = "does not exist" if not path.exists() else "is not a readable file"
            raise ConfigError(f"credential {cred.id!r}: {path} {problem}", entry=entry)


def remove(root: Path) -> None:
    """Remove the SetCredential= files (QEMU has read them once it runs)."""
    shutil.rmtree(root / DIRECTORY, ignore_errors=True)
