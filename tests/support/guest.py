"""The test guest: one initramfs whose /init does what `qemu_unit.mode=` says.

Every console line a test looks for starts with `qemu-unit-guest:`. Modes:
poweroff, wait, ignore, reboot, ready, net, efivar, devices, secureboot, fill, flood,
shell, state (see TEST_INIT).
`flood` prints `qemu_unit.lines=` (default 100000) lines `flood N` (or, with
`qemu_unit.text=empty` or `short`, empty or two-character lines) as fast as
it can, then `FLOOD-END`, then waits for the power button; `shell` runs an
interactive shell on the console (where `flood [N]` does the same) and powers
off on the power button or when the shell exits. Once the
guest has printed `qemu-unit-guest: booted`, an ACPI power button press is
never lost: the button is opened before that line, and evdev queues presses.
Extra kernel arguments: `qemu_unit.url=URL` (net: fetch URL and print
`fetched BODY`), `qemu_unit.ip=dhcp` (net: DHCP instead of 10.0.2.15/24),
`qemu_unit.serve=PORT` (net: serve the page `guest-page` on PORT, printing
`serving on PORT`),
`qemu_unit.efivar=VALUE` (efivar: the value to create, default `hello`),
`qemu_unit.shares=TAG,...` (devices: the virtio-fs tags to mount at /mnt/TAG, read
`hello` from and write `from-guest` to; `devices` also prints the TPM's endorsement key
digest).
"""

from __future__ import annotations

import functools
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from qemu_unit.cli import demo

# Outside /tmp: a container booted by the harness gets a fresh /tmp.
CACHE_DIR = Path("/var/tmp/qemu-unit-tests/guest")
PREFIX = "qemu-unit-guest:"
# virtio_pci/virtio_net for `net`, efivarfs for `efivar` (all modules in Debian's cloud kernel).
# virtio_blk for `fill`.
# virtiofs (and fuse, its dependency) for `devices`.
MODULES = ("button", "evdev", "virtio_pci", "virtio_net", "virtio_blk", "efivarfs", "virtiofs")
EFIVAR_GUID = "5d1b7a0e-4c1f-4e0b-9a53-7c2f3e8d9b10"
EFIVAR_NAME = f"QemuUnitTest-{EFIVAR_GUID}"

TEST_INIT = r"""#!/bin/sh
. /lib/guest.sh
say() { echo "qemu-unit-guest: $*"; }

off() {
    say "powering off"
    poweroff -f
}

# wait for the power button, then power off
wait_then_off() {
    if wait_power_button; then say "power button pressed"; fi
    off
}

net() {
    ip link set lo up
    ip link set eth0 up || { say "no eth0"; return; }
    if [ "$(cmdline_arg qemu_unit.ip)" = dhcp ]; then
        udhcpc -i eth0 -n -q -t 5 -s /etc/udhcpc.script >/dev/null 2>&1 || say "dhcp failed"
    else
        # QEMU user networking (slirp): guest 10.0.2.15, gateway/host 10.0.2.2
        ip addr add 10.0.2.15/24 dev eth0
        ip route add default via 10.0.2.2
    fi
    addr=$(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p')
    say "ip ${addr:-none}"
    # slirp forwards 10.0.2.2 to the host's loopback: a test serves something there (the
    # unit's guest firewall refuses it unless AllowHostLoopback=yes; bare QEMU has none)
    # qemu_unit.serve=PORT: a page ("guest-page") served on PORT, for a published port
    port=$(cmdline_arg qemu_unit.serve)
    if [ -n "$port" ]; then
        mkdir -p /www && echo guest-page >/www/index.html
        httpd -p "$port" -h /www && say "serving on $port"
    fi
    url=$(cmdline_arg qemu_unit.url)
    if [ -n "$url" ]; then
        # not `wget -T`: it segfaults in Debian 12's busybox-static (1.35)
        if body=$(timeout 15 wget -q -O - "$url"); then
            say "fetched $body"
        else
            say "fetch failed $url"
        fi
    fi
}

efivar() {
    dir=/sys/firmware/efi/efivars
    if [ ! -d /sys/firmware/efi ]; then say "efivar: not booted with UEFI"; return; fi
    mount -t efivarfs efivarfs "$dir" || { say "efivar: cannot mount efivarfs"; return; }
    var="$dir/@EFIVAR_NAME@"
    if [ -e "$var" ]; then
        # the first 4 bytes are the attributes
        say "efivar=$(tail -c +5 "$var")"
    else
        value=$(cmdline_arg qemu_unit.efivar)
        # attributes NV|BS|RT, then the data; efivarfs wants it in a single write
        printf '\007\000\000\000%s' "${value:-hello}" >/tmp/efivar
        if dd if=/tmp/efivar of="$var" bs=4096 count=1 2>/dev/null; then
            say "efivar created"
        else
            say "efivar: write failed"
        fi
    fi
}

# write to the first virtio disk until it is full or fails, then wait for the button
fill() {
    if [ ! -b /dev/vda ]; then say "fill: no /dev/vda"; return; fi
    say "filling /dev/vda"
    dd if=/dev/urandom of=/dev/vda bs=64k conv=fsync 2>/dev/null
    say "fill ended"
}

# secureboot: the firmware's SecureBoot variable (1: enabled), as the guest's kernel sees it
secureboot() {
    dir=/sys/firmware/efi/efivars
    if [ ! -d /sys/firmware/efi ]; then say "secureboot: not booted with UEFI"; return; fi
    mount -t efivarfs efivarfs "$dir" 2>/dev/null
    var="$dir/SecureBoot-8be4df61-93ca-11d0-aa0d-00e098032b8c"
    # the first 4 bytes are the attributes
    say "secureboot: $(od -An -tu1 -j4 -N1 "$var" 2>/dev/null | tr -d ' ' || echo unknown)"
}

# devices: the TPM (its persistent endorsement key) and the shares of qemu_unit.shares=
devices() {
    if [ -c /dev/tpm0 ]; then
        say "tpm: /dev/tpm0"
        # TPM2_ReadPublic of the endorsement key swtpm_setup made persistent at
        # 0x81010001 (no authorization): it changes only with the TPM's state.
        exec 9<>/dev/tpm0
        printf '\200\001\000\000\000\016\000\000\001\163\201\001\000\001' >&9
        dd bs=4096 count=1 <&9 >/tmp/ek 2>/dev/null
        exec 9<&-
        say "tpm: rc $(od -An -tx1 -j6 -N4 /tmp/ek | tr -d ' ')"
        say "tpm: ek $(md5sum </tmp/ek | cut -d' ' -f1)"
    else
        say "tpm: none"
    fi
    for tag in $(cmdline_arg qemu_unit.shares | tr , ' '); do
        mkdir -p "/mnt/$tag"
        if ! mount -t virtiofs "$tag" "/mnt/$tag"; then say "share $tag: mount failed"; continue; fi
        say "share $tag: read $(cat "/mnt/$tag/hello" 2>&1)"
        say "share $tag: files $(find "/mnt/$tag" -type f 2>/dev/null | wc -l)"
        if echo "from guest" >"/mnt/$tag/from-guest" 2>/dev/null; then
            say "share $tag: write ok"
        else
            say "share $tag: write failed"
        fi
    done
}

# flood [N [TEXT]]: N lines (default 100000) as fast as the guest prints, then FLOOD-END;
# TEXT: `flood I` (numbered, the default), `empty` or `short` (two characters each)
cat >/bin/flood <<'EOF'
#!/bin/sh
n=${1:-100000}
read start _ </proc/uptime
case "$2" in
empty) yes "" | head -n "$n" ;;
short) yes ab | head -n "$n" ;;
*)
    i=0
    while [ $i -lt $n ]; do
        echo "flood $i"
        i=$((i + 1))
    done
    ;;
esac
echo FLOOD-END
read end _ </proc/uptime
# the guest's own view: how long printing took (longer than bare QEMU: something held it up)
cs=$(( ${end%.*}${end#*.} - ${start%.*}${start#*.} ))
echo "qemu-unit-guest: flood of $n lines took $((cs / 100)) s"
EOF
chmod 755 /bin/flood

# state: what survives a save and a snapshot. A token drawn at this boot lives only in
# RAM (a shell variable) and is printed with a counter every second: a restored guest
# goes on with the same token and a higher count, a cold boot draws a new one. With a
# disk (/dev/vda) the token of the boot before is read from it, then this boot's is
# written; with a TPM its endorsement key digest is printed (devices).
state() {
    token=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')
    if [ -b /dev/vda ]; then
        say "disk: $(head -c 64 /dev/vda | tr -d '\000' | head -n 1)"
        printf '%s\n' "$token" | dd of=/dev/vda conv=fsync 2>/dev/null || say "disk: write failed"
    fi
    devices
    say "token $token"
    wait_then_off &
    i=0
    while true; do
        i=$((i + 1))
        say "tick $i $token"
        sleep 1
    done
}

mode=$(cmdline_arg qemu_unit.mode)
echo  # firmware may leave escape codes on the current console line
say "booted"
say "mode=${mode:-none}"
case "$mode" in
poweroff)
    off
    ;;
ignore)
    say "ignoring power button"
    while true; do
        if wait_power_button; then say "power button pressed"; fi
    done
    ;;
reboot)
    if wait_power_button 3; then
        say "power button pressed"
        off
    fi
    say "rebooting"
    reboot -f
    ;;
ready)
    sleep 3
    say "service ready"
    wait_then_off
    ;;
net)
    net
    wait_then_off
    ;;
efivar)
    efivar
    wait_then_off
    ;;
devices)
    devices
    wait_then_off
    ;;
secureboot)
    secureboot
    wait_then_off
    ;;
fill)
    fill
    wait_then_off
    ;;
flood)
    flood "$(cmdline_arg qemu_unit.lines)" "$(cmdline_arg qemu_unit.text)"
    wait_then_off
    ;;
state)
    state
    ;;
shell)
    wait_then_off &
    say "shell ready"
    sh -i
    say "shell exited"
    ;;
*)
    wait_then_off
    ;;
esac
off
""".replace("@EFIVAR_NAME@", EFIVAR_NAME)


@functools.cache
def build_test_guest() -> demo.Guest:
    """The test guest, built once per process (and cached on disk across runs)."""
    return demo.build_guest(CACHE_DIR, TEST_INIT, modules=MODULES)


def cmdline(mode: str, *extra: str) -> str:
    """A kernel command line for the test guest in MODE."""
    # no_timer_check: on a busy host a TCG guest is too slow for the kernel's IO-APIC timer
    # check and panics ("IO-APIC + timer doesn't work!"); seen with 30 VMs on 2 cores.
    return " ".join((build_test_guest().cmdline, "no_timer_check", f"qemu_unit.mode={mode}",
                     *extra))


class BareQemu:
    """A guest under bare QEMU (TCG), no libvirt: proves the guest itself works.

    The serial console is read line by line; `monitor()` sends HMP commands
    (e.g. `system_powerdown`). Leaving the block kills QEMU if it still runs.
    """

    def __init__(self, guest: demo.Guest, append: str, qemu_args: Sequence[str] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="qemu-unit-bare-")
        self._monitor_path = Path(self._tmp.name, "monitor.sock")
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-reboot",
             "-display", "none", "-serial", "stdio",
             "-monitor", f"unix:{self._monitor_path},server=on,wait=off",
             "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
             "-append", append, *qemu_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """The first console line containing TEXT; fails after TIMEOUT seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self._proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no console line with {text!r} in {timeout} s; got:\n"
                                         + "\n".join(self.lines[-40:]))
                self._cond.wait(min(left, 0.2))

    def monitor(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self._monitor_path))
            s.sendall(command.encode() + b"\n")
            time.sleep(0.2)  # HMP has no reply framing; give it time to act before closing

    def wait_exit(self, timeout: float = 30) -> int:
        return self._proc.wait(timeout)

    def __enter__(self) -> BareQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._reader.join(5)
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        self._tmp.cleanup()


def bare_qemu(mode: str, *extra: str, qemu_args: Sequence[str] = ()) -> BareQemu:
    """The test guest in MODE under bare QEMU."""
    return BareQemu(build_test_guest(), cmdline(mode, *extra), qemu_args)
