"""A tiny bootable guest built from Debian's own packages: no image download.

The kernel is Debian's cloud kernel (`apt-get download`), the initramfs is
busybox-static, a shell `/init` and the few kernel modules it needs (the ACPI
power button, evdev, ...). The result is cached, keyed on the kernel package
version and the initramfs contents: a second build costs one apt-cache call.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import gzip
import hashlib
import lzma
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qemu_unit import command
from qemu_unit.config.unitfile import escape_specifiers
from qemu_unit.errors import QemuUnitError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BASE_CMDLINE = "console=ttyS0 quiet"
# What the ACPI power button needs; everything else is opt-in.
DEFAULT_MODULES: tuple[str, ...] = ("button", "evdev")

# Sourced by every /init: mounts, busybox applets, modules, and the helpers
# init scripts use (cmdline_arg, wait_power_button).
GUEST_LIB = r"""# qemu-unit guest library, sourced by /init
PATH=/bin
export PATH
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/order); do
    # efivarfs refuses to load without UEFI firmware
    [ "$m" = efivarfs ] && [ ! -d /sys/firmware/efi ] && continue
    insmod "/lib/modules/$m.ko" || echo "insmod $m failed"
done

# cmdline_arg NAME: the value of NAME= on the kernel command line (empty if absent)
cmdline_arg() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}"; return 0;; esac
    done
}

# power_buttons: the event devices named "Power Button" (ACPI may offer two)
power_buttons() {
    for d in /sys/class/input/event*; do
        [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] && echo "/dev/input/${d##*/}"
    done
}

# Open the buttons now: evdev queues events from open on, so a press that comes
# before anyone waits for it is not lost.
POWER_BUTTON_FDS=""
fd=3
for dev in $(power_buttons); do
    eval "exec $fd<$dev"
    POWER_BUTTON_FDS="$POWER_BUTTON_FDS $fd"
    fd=$((fd + 1))
done

# read_press FD: read input events (24 bytes on x86_64) from FD until one is a
# press of KEY_POWER: type EV_KEY (1), code 116 (0x74), value 1
read_press() {
    while :; do
        ev=$(dd bs=24 count=1 2>/dev/null <&"$1" | od -An -tx1 -v | tr -d ' \n')
        case "$ev" in
        *0100740001000000) return 0;;
        "") return 1;;
        esac
    done
}

# wait_power_button [SECONDS]: succeeds once the button is pressed, fails on timeout.
wait_power_button() {
    fifo=/tmp/power-button.$$
    rm -f "$fifo"; mkfifo "$fifo"
    pids=""
    for fd in $POWER_BUTTON_FDS; do
        (read_press "$fd" && echo pressed) >"$fifo" &
        pids="$pids $!"
    done
    if [ -z "$pids" ]; then echo "no power button found"; fi
    if [ -n "$1" ]; then
        (sleep "$1"; echo timeout) >"$fifo" &
        pids="$pids $!"
    fi
    # with neither buttons nor a timeout this blocks forever, which is what "wait" means
    read -r what <"$fifo"
    kill $pids 2>/dev/null
    # a reader left behind would swallow the next press
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = dd ] && kill "${p#/proc/}" 2>/dev/null
    done
    rm -f "$fifo"
    [ "$what" = pressed ]
}
"""

# busybox udhcpc only reports a lease; this applies it (for guests on a DHCP network).
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}"
    ;;
esac
"""

DEMO_INIT = r"""#!/bin/sh
. /lib/guest.sh
echo
echo "qemu-unit demo guest: hello from $(uname -r)"
runfor=$(cmdline_arg qemu_unit.runfor)
if [ -n "$runfor" ]; then
    echo "qemu-unit demo guest: powering off by itself in $runfor s (or on the power button)"
    if wait_power_button "$runfor"; then
        echo "qemu-unit demo guest: power button pressed, powering off"
    else
        echo "qemu-unit demo guest: $runfor s are over, powering off"
    fi
else
    echo "qemu-unit demo guest: press the power button (systemctl stop) to power off"
    wait_power_button
    echo "qemu-unit demo guest: power button pressed, powering off"
fi
poweroff -f
"""


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    cmdline: str


@functools.cache
def _kernel_candidate() -> tuple[str, str]:
    """(package, version) of the kernel the metapackage depends on, from one apt-cache call."""
    hint = "run `apt-get update` once (as root) so that apt knows the package lists"
    try:
        out = command.run(["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE],
                   f"looking up {KERNEL_METAPACKAGE}")
    except QemuUnitError as e:
        raise QemuUnitError(f"{e}; {hint}") from e
    m = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,(]*-cloud-amd64)\s*\(=\s*([^)\s]+)\)",
                  out, re.MULTILINE)
    if m is None:
        raise QemuUnitError(f"{KERNEL_METAPACKAGE} names no linux-image-*-cloud-amd64 "
                            f"dependency; {hint}")
    return m.group(1), m.group(2)


def _find_busybox() -> Path:
    try:
        listing = command.run(["dpkg", "-L", BUSYBOX_PACKAGE], "finding busybox")
    except QemuUnitError as e:
        raise QemuUnitError(f"{e} (install the Debian package {BUSYBOX_PACKAGE})") from e
    for line in listing.splitlines():
        if line.endswith("bin/busybox") and Path(line).is_file():
            return Path(line)
    raise QemuUnitError(f"{BUSYBOX_PACKAGE} ships no bin/busybox")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Tests and users may build into the same cache at once; one builds, the others wait.
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _make_dir(path: Path) -> Path:
    # QEMU runs as the unprivileged qemu-run user: it must reach and read every file,
    # so every directory made here is 0755 whatever the umask.
    missing = [d for d in (path, *path.parents) if not d.exists()]
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        d.chmod(0o755)
    path.chmod(0o755)
    return path


def _file_name(package: str, version: str) -> str:
    # No ':' (epochs) and so no '%3a' as apt writes it: '%' starts a specifier in .vm files.
    return f"{package}_{version}".replace(":", "_")


def _download(package: str, version: str, debs: Path) -> Path:
    deb = debs / f"{_file_name(package, version)}_amd64.deb"
    if deb.is_file():
        return deb
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        command.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
              f"{package}={version}"],
             f"downloading {package} {version} (apt-get update may be needed)", cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise QemuUnitError(f"apt-get download {package} left {len(got)} files, not one")
        got[0].chmod(0o644)
        os.replace(got[0], deb)
    return deb


@functools.cache
def _unpack(deb: Path) -> Path:
    """DEB unpacked once per process (unxz alone takes ~1.3 s), removed when it exits."""
    for stale in deb.parent.glob(".unpacked-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not Path("/proc", pid).exists():  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
    tree = Path(tempfile.mkdtemp(prefix=f".unpacked-{os.getpid()}-", dir=deb.parent))
    atexit.register(shutil.rmtree, tree, ignore_errors=True)
    command.run(["dpkg-deb", "-x", str(deb), str(tree)], f"unpacking {deb.name}")
    return tree


def _module_depends(ko: bytes) -> list[str]:
    # modinfo's "depends=" lives NUL-separated in the module's .modinfo section.
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _read_module(path: Path) -> bytes:
    # busybox insmod reads plain ELF only, so undo whatever compression Debian chose.
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return command.run_bytes(["zstd", "-dc", str(path)], f"decompressing {path.name}")
    return data


def _collect_modules(tree: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """WANTED and their dependencies, each after what it depends on."""
    index: dict[str, Path] = {}
    for path in tree.glob("lib/modules/*/kernel/**/*.ko*"):
        index[re.sub(r"\.ko(\.\w+)?$", "", path.name).replace("-", "_")] = path
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise QemuUnitError(f"kernel module {name} is not in the kernel package "
                                "(built in, or misspelt?)")
        data = _read_module(index[name])
        for dep in _module_depends(data):
            visit(dep)
        ordered.append((name, data))

    for name in wanted:
        visit(name)
    return ordered


def _write_cpio_gz(root: Path, dest: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = command.run_bytes(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet"],
        "making the initrd", root, input=("\n".join(names) + "\n").encode(),
    )
    dest.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))


def _build_initrd(tree: Path, init_script: str, modules: Sequence[str], busybox: Path,
                  dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        root = Path(tmp, "root")
        for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(busybox, root / "bin/busybox")
        (root / "bin/busybox").chmod(0o755)
        (root / "bin/sh").symlink_to("busybox")  # /init's interpreter; the rest come at boot
        (root / "init").write_text(init_script)
        (root / "init").chmod(0o755)
        (root / "lib/guest.sh").write_text(GUEST_LIB)
        (root / "etc/udhcpc.script").write_text(UDHCPC_SCRIPT)
        (root / "etc/udhcpc.script").chmod(0o755)
        order = []
        for name, data in _collect_modules(tree, modules):
            (root / f"lib/modules/{name}.ko").write_bytes(data)
            order.append(name)
        (root / "lib/modules/order").write_text("".join(f"{n}\n" for n in order))
        part = Path(tmp, "initrd.img")
        _write_cpio_gz(root, part)
        part.chmod(0o644)
        os.replace(part, dest)


def build_guest(dest: Path, init_script: str,
                modules: Sequence[str] = DEFAULT_MODULES) -> Guest:
    """Build (or reuse) a kernel and an initramfs running INIT_SCRIPT as /init under DEST.

    MODULES are kernel modules to put in the initramfs, with their dependencies;
    the guest library loads them all at boot.
    """
    package, version = _kernel_candidate()
    busybox = _find_busybox()
    _make_dir(dest)
    key = hashlib.sha256()
    for part in (init_script, GUEST_LIB, "\0".join(modules)):
        key.update(part.encode() + b"\0")
    key.update(busybox.read_bytes())
    key.update(Path(__file__).read_bytes())  # a change to this builder is a change of initrd
    kdir = dest / _file_name(package, version)
    kernel = kdir / "vmlinuz"
    initrd = kdir / f"initrd-{key.hexdigest()[:16]}.img"
    guest = Guest(kernel=kernel, initrd=initrd, cmdline=BASE_CMDLINE)
    if kernel.is_file() and initrd.is_file():
        return guest

    with _locked(dest):
        if kernel.is_file() and initrd.is_file():  # built while we waited
            return guest
        _make_dir(kdir)
        deb = _download(package, version, _make_dir(dest / "debs"))
        tree = _unpack(deb)
        if not kernel.is_file():
            found = sorted(tree.glob("boot/vmlinuz-*"))
            if not found:
                raise QemuUnitError(f"{deb.name} contains no boot/vmlinuz-*")
            shutil.copyfile(found[0], kdir / "vmlinuz.part")
            (kdir / "vmlinuz.part").chmod(0o644)
            os.replace(kdir / "vmlinuz.part", kernel)
        _build_initrd(tree, init_script, modules, busybox, initrd)
    return guest


def _escape(value: object) -> str:
    return escape_specifiers(str(value))  # .vm values expand specifiers


def write_demo(config_dir: Path, data_dir: Path, runfor: int | None = None) -> Path:
    """Build the demo guest in DATA_DIR and write CONFIG_DIR/demo.vm; return its path.

    With RUNFOR the guest powers itself off after that many seconds.
    """
    guest = build_guest(data_dir, DEMO_INIT)
    cmdline = guest.cmdline
    if runfor is not None:
        if runfor < 0:
            raise QemuUnitError(f"runfor must not be negative, not {runfor}")
        cmdline += f" qemu_unit.runfor={runfor}"
    text = (
        "[Unit]\n"
        "Description=qemu-unit demo VM\n"
        "\n"
        "[VM]\n"
        "Memory=256M\n"
        "CPUs=1\n"
        f"Kernel={_escape(guest.kernel)}\n"
        f"Initrd={_escape(guest.initrd)}\n"
        f"KernelCmdline={_escape(cmdline)}\n"
    )
    return _write_vm(config_dir, "demo", text)


def _write_vm(config_dir: Path, name: str, text: str) -> Path:
    """Write CONFIG_DIR/NAME.vm atomically, readable by the VM's user."""
    _make_dir(config_dir)
    path = config_dir / f"{name}.vm"
    part = config_dir / f".{name}.vm.part"
    part.write_text(text)
    part.chmod(0o644)
    os.replace(part, path)
    return path


CLOUD_SSH_PORT = 2222


def first_key(path: Path) -> str:
    """The first key line of an OpenSSH public key file."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise QemuUnitError(f"{path}: no SSH public key in it")


def find_ssh_key(home: Path) -> str:
    """The first public key in HOME/.ssh (ed25519 first), as text: the VM's user cannot
    read a file in root's home, so the key goes into the .vm file itself."""
    for name in ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"):
        path = home / ".ssh" / name
        if path.is_file():
            return first_key(path)
    raise QemuUnitError(f"no SSH public key in {home}/.ssh (make one with ssh-keygen, or "
                        "give --ssh-key FILE)")


def write_cloud_demo(config_dir: Path, image: Path, key: str) -> Path:
    """Write CONFIG_DIR/cloud.vm: the cloud image IMAGE as a service, SSH on 127.0.0.1:2222."""
    if not image.is_absolute() or not image.is_file():
        raise QemuUnitError(f"{image}: not an existing file given by its absolute path")
    text = (
        "[VM]\n"
        f"Image={_escape(image)}\n"
        f"SSHAuthorizedKey={key}\n"
        f"PublishPort=127.0.0.1:{CLOUD_SSH_PORT}:22\n"
        "Ready=agent\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
    return _write_vm(config_dir, "cloud", text)
