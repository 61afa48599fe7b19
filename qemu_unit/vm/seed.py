"""cloud-init's NoCloud seed: an ISO 9660 image labelled `cidata`.

It holds `meta-data` (a stable instance-id, the hostname, the SSH keys as
`public-keys`), `user-data` (the UserData= file as is, else an empty
cloud-config), with NetworkConfig= `network-config`, and with Share= `vendor-data`
that mounts each share at /mnt/TAG or its ShareMount=. The keys go into
meta-data, not user-data, so that a user's own cloud-config needs no merging:
cloud-init installs a NoCloud source's public-keys for the default user.

Written with pycdlib (a pure-Python ISO 9660 library, in Debian as
python3-pycdlib): no genisoimage/xorriso process to find and sandbox, no
temporary directory tree, and the seed is written atomically with its mode set.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qemu_unit.config.files import SEED_FILE_MAX, read_limited
from qemu_unit.config.settings import VMConfig
from qemu_unit.errors import ConfigError

VOLUME_LABEL = "cidata"
EMPTY_USER_DATA = b"#cloud-config\n{}\n"


@dataclass(frozen=True)
class Seed:
    """What the guest learns at first boot."""

    instance_id: str
    hostname: str
    ssh_keys: tuple[str, ...] = ()
    user_data: bytes | None = None  # None: an empty cloud-config
    network_config: bytes | None = None
    # virtio-fs shares: (tag, mount point, read-only)
    shares: tuple[tuple[str, str, bool], ...] = ()

    def files(self) -> dict[str, bytes]:
        """The seed's files by name (meta-data is JSON, which YAML reads)."""
        meta: dict[str, object] = {
            "instance-id": self.instance_id,
            "local-hostname": self.hostname,
        }
        if self.ssh_keys:
            meta["public-keys"] = list(self.ssh_keys)
        files = {
            "meta-data": json.dumps(meta, indent=1).encode() + b"\n",
            "user-data": EMPTY_USER_DATA if self.user_data is None else self.user_data,
        }
        if self.network_config is not None:
            files["network-config"] = self.network_config
        if self.shares:
            files["vendor-data"] = _mount_shares(self.shares)
        return files


def _mount_shares(shares: tuple[tuple[str, str, bool], ...]) -> bytes:
    """vendor-data (so the user's own user-data needs no merging) mounting each share.

    Not cloud-init's `mounts`: its 22.4 takes a bare TAG for a device name (/dev/TAG) and
    skips it. bootcmd runs at every boot: the fstab line once (a changed mount point
    replaces the tag's old line), then the mount.
    """
    commands = []
    # Tags are A-Z a-z 0-9 _ . - and mount points also / @ + (settings): nothing to quote.
    for tag, point, readonly in shares:
        line = f"{tag} {point} virtiofs {'ro,' if readonly else ''}defaults,nofail 0 0"
        commands.append(f"mkdir -p {point} && (grep -qxF '{line}' /etc/fstab || "
                        f"(sed -i '/^{re.escape(tag)} .* virtiofs /d' /etc/fstab && "
                        f"echo '{line}' >>/etc/fstab)) && (mountpoint -q {point} || "
                        f"mount {point})")
    return b"#cloud-config\n" + json.dumps({"bootcmd": commands}, indent=1).encode() + b"\n"


def _read(path: Path, vm: VMConfig, key: str) -> bytes:
    entry = vm.origin(key)
    try:
        return read_limited(path, SEED_FILE_MAX)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", entry=entry, key=key) from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", entry=entry, key=key) from None


def from_vm(vm: VMConfig) -> Seed:
    """VM's seed, with the files it names read now (at each start: they may change)."""
    keys: list[str] = []
    for key in vm.ssh_authorized_keys:
        if isinstance(key, Path):
            text = _read(key, vm, "SSHAuthorizedKey").decode(errors="replace")
            keys += [line.strip() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        else:
            keys.append(key)
    return Seed(
        instance_id=f"iid-{vm.domain_uuid()}",
        hostname=vm.guest_hostname(),
        ssh_keys=tuple(keys),
        user_data=_read(vm.user_data, vm, "UserData") if vm.user_data else None,
        network_config=(_read(vm.network_config, vm, "NetworkConfig")
                        if vm.network_config else None),
        shares=tuple((s.tag, s.mount_point, s.readonly) for s in vm.shares),
    )


# ISO 9660 level-1 names; Rock Ridge and Joliet carry the real ones.
_ISO_NAMES = {"meta-data": "METADATA.;1", "user-data": "USERDATA.;1",
              "network-config": "NETWORK.;1", "vendor-data": "VENDORDA.;1"}


def write_iso(seed: Seed, path: Path) -> None:
    """Write SEED as a NoCloud ISO to PATH (mode 0600: user-data may hold secrets)."""
    import pycdlib  # only VMs with a seed pay for it

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for name, data in seed.files().items():
        iso.add_fp(io.BytesIO(data), len(data), f"/{_ISO_NAMES[name]}", rr_name=name,
                   joliet_path=f"/{name}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            iso.write_fp(f)
    finally:
        iso.close()
    os.replace(tmp, path)
