"""A Debian 12 cloud-image-like guest, built from Debian packages once per machine.

`build_debian_image()` returns a `DebianImage`: a qcow2 disk with a GPT, an EFI
system partition holding systemd-boot (so the image boots through its own boot
loader under `Firmware=uefi`, as a downloaded cloud image does) and an ext4 root
partition labelled `root`; next to it the kernel and initrd, for the faster
direct boot (`Kernel=` with `root=PARTLABEL=root`).

No loop devices and no mounts: `mmdebstrap` makes the tree, `mkfs.ext4 -d` the
root file system, `mkfs.vfat -C` + mtools the ESP, `sfdisk` the partition
table, `dd` places both, `qemu-img convert` makes the qcow2.

Cached under /var/tmp/qemu-unit-tests/debian12/RECIPE-HASH/ (outside the
checkout), keyed on everything in this recipe; a lock keeps parallel test
sessions from building it twice at once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_ROOT = Path("/var/tmp/qemu-unit-tests/debian12")
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "cloud-init", "qemu-guest-agent", "openssh-server",
    "sudo", "linux-image-cloud-amd64", "ifupdown", "isc-dhcp-client", "iproute2",
    # systemd-creds --with-key=tpm2 (systemd only suggests them).
    "libtss2-esys-3.0.2-0", "libtss2-mu0", "libtss2-rc0",
)
ESP_KIB = 131072
ROOT_MIB = 2048
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Linux root (x86-64)
CMDLINE = "root=PARTLABEL=root rw console=ttyS0"
DEFAULT_USER = "debian"  # Debian's cloud-init puts SSH keys on this user

# Files written into the tree after mmdebstrap: what a Debian cloud image has.
TREE_FILES = {
    "etc/fstab": "PARTLABEL=root / ext4 rw,discard,errors=remount-ro 0 1\n",
    "etc/hostname": "localhost\n",
    # cloud-init's fallback DHCP configuration goes to interfaces.d.
    "etc/network/interfaces": "source /etc/network/interfaces.d/*\n\nauto lo\n"
                              "iface lo inet loopback\n",
    # Only NoCloud: no probing of cloud metadata services (the guest reaches nothing anyway).
    "etc/cloud/cloud.cfg.d/90-qemu-unit-tests.cfg": "datasource_list: [NoCloud, None]\n",
}


@dataclass(frozen=True)
class DebianImage:
    disk: Path  # qcow2: GPT, ESP with systemd-boot, root partition "root"
    kernel: Path
    initrd: Path
    cmdline: str = CMDLINE
    user: str = DEFAULT_USER


def _recipe() -> str:
    recipe = {"suite": SUITE, "packages": PACKAGES, "files": TREE_FILES, "esp": ESP_KIB,
              "root": ROOT_MIB, "cmdline": CMDLINE, "version": 1}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _run(*cmd: str | Path, cwd: Path | None = None) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                            "LANG": "C.UTF-8", "HOME": "/root"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _one(tree: Path, pattern: str) -> Path:
    found = sorted(tree.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} in {tree}, found {found}")
    return found[0]


def _make_tree(tree: Path) -> None:
    _run("mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}",
         SUITE, tree)
    for rel, text in TREE_FILES.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    # A first boot: systemd and cloud-init start from nothing.
    (tree / "etc/machine-id").write_text("")
    shutil.rmtree(tree / "var/lib/cloud", ignore_errors=True)


def _make_esp(tree: Path, kernel: Path, initrd: Path, esp: Path, work: Path) -> None:
    _run("mkfs.vfat", "-n", "ESP", "-C", esp, str(ESP_KIB))
    loader = work / "loader.conf"
    loader.write_text("timeout 0\ndefault debian.conf\n")
    entry = work / "debian.conf"
    entry.write_text(f"title Debian 12\nlinux /vmlinuz\ninitrd /initrd.img\noptions {CMDLINE}\n")
    image = f"-i{esp}"
    _run("mmd", image, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries")
    _run("mcopy", image, "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
         "::/EFI/BOOT/BOOTX64.EFI")
    _run("mcopy", image, kernel, "::/vmlinuz")
    _run("mcopy", image, initrd, "::/initrd.img")
    _run("mcopy", image, loader, "::/loader/loader.conf")
    _run("mcopy", image, entry, "::/loader/entries/debian.conf")


def _assemble(esp: Path, root: Path, raw: Path) -> None:
    mib = 1024 * 1024
    esp_start = 1  # MiB
    root_start = esp_start + ESP_KIB // 1024
    size = (root_start + ROOT_MIB + 1) * mib  # + the backup GPT
    with open(raw, "wb") as f:
        f.truncate(size)
    table = (
        "label: gpt\n"
        f"start={esp_start}MiB, size={ESP_KIB // 1024}MiB, type={ESP_TYPE}, name=\"esp\"\n"
        f"start={root_start}MiB, size={ROOT_MIB}MiB, type={ROOT_TYPE}, name=\"root\"\n"
    )
    proc = subprocess.run(["sfdisk", "--quiet", str(raw)], input=table, text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sfdisk failed: {proc.stderr}")
    for part, start in ((esp, esp_start), (root, root_start)):
        _run("dd", f"if={part}", f"of={raw}", "bs=1M", f"seek={start}", "conv=notrunc,sparse",
             "status=none")


def _publish(raw: Path, dest: Path, *extra: tuple[Path, str]) -> None:
    """RAW as DEST/disk.qcow2, with the EXTRA files, made visible by one rename."""
    out = raw.parent / "out"
    out.mkdir()
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out / "disk.qcow2")
    for src, name in extra:
        shutil.copyfile(src, out / name)
    for f in out.iterdir():
        f.chmod(0o644)
    out.chmod(0o755)
    out.rename(dest)


def _build(dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
    try:
        tree = work / "tree"
        _make_tree(tree)
        kernel = _one(tree, "boot/vmlinuz-*")
        initrd = _one(tree, "boot/initrd.img-*")
        esp = work / "esp.img"
        _make_esp(tree, kernel, initrd, esp, work)
        root = work / "root.img"
        _run("mkfs.ext4", "-q", "-L", "root", "-d", tree, root, f"{ROOT_MIB}M")
        raw = work / "disk.raw"
        _assemble(esp, root, raw)
        _publish(raw, dest, (kernel, "vmlinuz"), (initrd, "initrd.img"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.cache
def build_debian_image() -> DebianImage:
    """The image, built on first use on this machine (about a minute and a half)."""
    dest = _cached(_recipe(), _build)
    return DebianImage(dest / "disk.qcow2", dest / "vmlinuz", dest / "initrd.img")


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """CACHE_ROOT/NAME, made by BUILD(dest) unless a disk.qcow2 is there already."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    dest = CACHE_ROOT / name
    with open(CACHE_ROOT / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it right now
        if not (dest / "disk.qcow2").exists():
            build(dest)
    os.chmod(CACHE_ROOT, 0o755)
    return dest


# Debian's Secure Boot chain: shim signed by Microsoft's UEFI CA, GRUB and the kernel signed
# by Debian's key, which shim trusts.
SIGNED_PACKAGES = ("shim-signed", "grub-efi-amd64-signed")
SIGNED_GRUB_CFG = f"set timeout=0\nlinux /vmlinuz {CMDLINE}\ninitrd /initrd.img\nboot\n"


def _build_signed(base: DebianImage, dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
    try:
        _run("apt-get", "download", *SIGNED_PACKAGES, cwd=work)
        for deb in work.glob("*.deb"):
            _run("dpkg-deb", "-x", deb, work / "x")
        esp = work / "esp.img"
        _run("mkfs.vfat", "-n", "ESP", "-C", esp, str(ESP_KIB))
        cfg = work / "grub.cfg"
        cfg.write_text(SIGNED_GRUB_CFG)
        image = f"-i{esp}"
        _run("mmd", image, "::/EFI", "::/EFI/BOOT")
        # The removable-media path: no boot entry needed. Signed GRUB reads grub.cfg
        # from the directory it was loaded from.
        for src, name in ((work / "x/usr/lib/shim/shimx64.efi.signed", "EFI/BOOT/BOOTX64.EFI"),
                          (work / "x/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
                           "EFI/BOOT/grubx64.efi"),
                          (cfg, "EFI/BOOT/grub.cfg"), (base.kernel, "vmlinuz"),
                          (base.initrd, "initrd.img")):
            _run("mcopy", image, src, f"::/{name}")
        raw = work / "disk.raw"
        _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", base.disk, raw)
        _run("dd", f"if={esp}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc,sparse",
             "status=none")
        _publish(raw, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.cache
def build_signed_debian_image() -> Path:
    """The image with Debian's Secure Boot chain on its ESP instead of (unsigned)
    systemd-boot: shim, GRUB and the kernel, all signed. Made from the image above."""
    base = build_debian_image()
    return _cached(f"{_recipe()}-signed", lambda dest: _build_signed(base, dest)) / "disk.qcow2"


if __name__ == "__main__":
    print(build_debian_image())
