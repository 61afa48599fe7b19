"""A real Debian 12 cloud image as qemu-run@NAME.service: Image=, cloud-init, credentials,
PublishPort=, Ready=agent, ShutdownMode=agent, reset, Ephemeral=, TPM=, Share= (cloud-init
mounts it; a secret sealed to the TPM is kept on it, outside the overlay reset removes).

One VM (`cloud`) boots through its own boot loader (GPT, ESP, systemd-boot, OVMF) and is
shared by the tests in order: first boot, restart, reset. Under TCG each boot takes from
~40 s on an idle machine to minutes on a busy one: the deadlines are generous. The same
image with SecureBoot=yes (`locked`) is refused by the firmware: its systemd-boot is unsigned;
with Debian's signed shim, GRUB and kernel on its ESP instead (`signed`) it boots, Secure Boot on.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import Container
from tests.support.debian import DebianImage, build_debian_image, build_signed_debian_image
from tests.support.vm import (
    CONFIG_DIR,
    install_qemu_unit,
    prop,
    qemu_pids,
    runner_log,
    wait_for,
    write_vm,
)

pytestmark = pytest.mark.system

DATA = Path("/srv/qemu-unit-cloud")
BOOT_TIMEOUT = 900  # seconds: a first boot with cloud-init under TCG on a loaded machine
SET_SECRET = "set-secret-6b1f0c9e"
LOAD_SECRET = "load-secret-93d2a7c4"
HOSTNAME = "cloudy"
TPM_SECRET = "tpm-secret-5e0d2c71"
SHARE = DATA / "share"
DOCS = DATA / "docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SSH_PORT = _free_port()
# Facts one test learns and a later one compares with.
SEEN: dict[str, str] = {}
TAKEN_PORT = _free_port()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cloud_vm(image: DebianImage) -> str:
    return f"""\
[VM]
Image={DATA}/base.qcow2
Firmware=uefi
Accel=tcg
Memory=1G
SSHAuthorizedKey={DATA}/id_ed25519.pub
Hostname={HOSTNAME}
PublishPort=127.0.0.1:{SSH_PORT}:22
RestrictNetwork=yes
Ready=agent
ShutdownMode=agent acpi
ShutdownTimeout=300s
SetCredential=test.set:{SET_SECRET}
LoadCredential=test.load
TPM=yes
Share={SHARE}:data
Share={DOCS}:docs:ro
ShareMount=docs:/srv/docs

[Service]
LoadCredential=test.load:{DATA}/load-secret
TimeoutStartSec={BOOT_TIMEOUT}
"""


def prepare(upper: Path) -> None:
    image = build_debian_image()
    data = upper / DATA.relative_to("/")
    data.mkdir(parents=True)
    for d in (data, data.parent):
        d.chmod(0o755)
    shutil.copyfile(image.disk, data / "base.qcow2")
    (data / "base.qcow2").chmod(0o644)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test",
                    "-f", str(data / "id_ed25519")], check=True)
    (data / "id_ed25519.pub").chmod(0o644)
    # Readable by root only: systemd's LoadCredential= reads it for the unit.
    (data / "load-secret").write_text(LOAD_SECRET)
    (data / "load-secret").chmod(0o600)
    shutil.copyfile(data / "id_ed25519.pub", data / "root-only.pub")
    (data / "root-only.pub").chmod(0o600)
    share = upper / SHARE.relative_to("/")
    share.mkdir()
    (share / "hello").write_text("hello from the host\n")
    (upper / DOCS.relative_to("/")).mkdir()
    (upper / DOCS.relative_to("/") / "readme").write_text("read-only docs\n")
    base = f"Image={DATA}/base.qcow2\nAccel=tcg\nRestrictNetwork=yes\n"
    write_vm(upper, "cloud", cloud_vm(image))
    write_vm(upper, "eph", f"[VM]\n{base}Ephemeral=yes\nShutdownTimeout=1s\n")
    write_vm(upper, "nobase", f"[VM]\nImage={DATA}/missing.qcow2\nAccel=tcg\nNetwork=none\n")
    write_vm(upper, "nokey", f"[VM]\n{base}SSHAuthorizedKey={DATA}/root-only.pub\n")
    write_vm(upper, "taken", f"[VM]\n{base}PublishPort=127.0.0.1:{TAKEN_PORT}:22\n")
    write_vm(upper, "badkey", "[VM]\nAccel=tcg\nPublishPort=127.0.0.1:22\n")
    shutil.copyfile(build_signed_debian_image(), data / "signed.qcow2")
    (data / "signed.qcow2").chmod(0o644)
    write_vm(upper, "signed", f"[VM]\nImage={DATA}/signed.qcow2\nAccel=tcg\nFirmware=uefi\n"
                              "SecureBoot=yes\nEphemeral=yes\nNetwork=none\nMemory=1G\n"
                              "ShutdownTimeout=0\n")
    # The same image (systemd-boot, which Debian 12 ships unsigned) under Secure Boot.
    write_vm(upper, "locked", f"[VM]\nImage={DATA}/base.qcow2\nAccel=tcg\nFirmware=uefi\n"
                              "SecureBoot=yes\nEphemeral=yes\nNetwork=none\nMemory=512M\n"
                              "ShutdownTimeout=0\n")


@pytest.fixture(scope="module")
def base_sum() -> str:
    return _sha256(build_debian_image().disk)


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path, base_sum: str) -> Iterator[Container]:
    with Container("cloud", prepare, stop_timeout=30) as ct:
        # Its SetCredential= value: root's only (the unit hands the file to the runner).
        ct.run("chmod", "0600", f"{CONFIG_DIR}/cloud.vm")
        install_qemu_unit(ct, qemu_unit_bin)
        SEEN["qemu-unit"] = str(qemu_unit_bin)
        yield ct
        # The copy the VMs booted from (and the cached original) are byte-identical.
        assert ct.run("sha256sum", f"{DATA}/base.qcow2").stdout.split()[0] == base_sum
    assert _sha256(build_debian_image().disk) == base_sum


def ssh(ct: Container, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ct.run("ssh", "-i", f"{DATA}/id_ed25519", "-p", str(SSH_PORT),
                  "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR",
                  "debian@127.0.0.1", command, check=check, timeout=120)


def wait_ssh(ct: Container) -> str:
    """Wait until SSH answers (as the image's default user, with the .vm's key)."""
    return wait_for("SSH", lambda: ssh(ct, "hostname", check=False).stdout.strip(),
                    timeout=BOOT_TIMEOUT)


def host_key(ct: Container) -> str:
    """The guest's SSH host key: cloud-init makes a new one at an instance's first boot."""
    return ssh(ct, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]


def reset(ct: Container, vm: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ct.run(SEEN["qemu-unit"], "reset", vm, check=check)


def start_and_wait_ready(ct: Container, vm: str) -> float:
    """`systemctl start --no-block`; check the unit stays activating until the agent answers."""
    unit = f"qemu-run@{vm}.service"
    start = time.monotonic()
    ct.systemctl("start", "--no-block", unit)

    def started() -> list[int]:
        assert prop(ct, unit, "ActiveState") != "failed", runner_log(ct, vm)
        return qemu_pids(ct, vm)

    wait_for("QEMU", started, timeout=120)
    assert prop(ct, unit, "ActiveState") == "activating"
    wait_for("status", lambda: "guest agent" in prop(ct, unit, "StatusText"), timeout=60)
    wait_for("ready", lambda: prop(ct, unit, "ActiveState") != "activating",
             timeout=BOOT_TIMEOUT)
    assert prop(ct, unit, "ActiveState") == "active", runner_log(ct, vm)
    assert "The guest agent answered: ready" in runner_log(ct, vm)
    return time.monotonic() - start


def test_first_boot_cloud_init_ssh_credentials(ct: Container) -> None:
    seconds = start_and_wait_ready(ct, "cloud")
    print(f"first boot with cloud-init (UEFI, TCG): ready after {seconds:.0f} s")
    # Through PublishPort=, as the image's default user, with the key from the .vm.
    assert wait_ssh(ct) == HOSTNAME
    assert ssh(ct, "sudo cat /run/credentials/@system/test.set").stdout == SET_SECRET
    assert ssh(ct, "sudo cat /run/credentials/@system/test.load").stdout == LOAD_SECRET
    ssh(ct, "echo kept > marker && sync")
    SEEN["host key"] = host_key(ct)
    # Share=: cloud-init mounted it at /mnt/data; a file from the host reads in the guest.
    assert ssh(ct, "cat /mnt/data/hello").stdout == "hello from the host\n"
    # ShareMount=: a :ro share at the path it names, read-only in the guest too.
    assert ssh(ct, "cat /srv/docs/readme; findmnt -no FSTYPE,SOURCE /srv/docs; "
                   "findmnt -no OPTIONS /srv/docs | tr , '\\n' | grep -x ro").stdout == (
        "read-only docs\nvirtiofs docs\nro\n")
    # TPM=: a secret sealed to the guest's TPM, kept on the share (reset removes the overlay).
    assert ssh(ct, "test -c /dev/tpmrm0 && echo tpm").stdout == "tpm\n"
    ssh(ct, f"printf {TPM_SECRET} | sudo systemd-creds encrypt --with-key=tpm2 "
            "--name=qemu-unit-test - /mnt/data/secret.cred")
    ct.run("test", "-s", f"{SHARE}/secret.cred")
    ct.run("sh", "-c", "test -s /var/lib/qemu-run/cloud/lib/swtpm/*/tpm2/tpm2-00.permall")
    # restrict=on: the guest reaches nothing, not even a server on the host's loopback
    # through slirp's gateway 10.0.2.2 (reached without restrict=on). Nothing is sent to
    # any other address: a test probes only this machine.
    port = _free_port()
    ct.run("systemd-run", "--unit=probe-listener", "--", "/usr/bin/python3", "-m",
           "http.server", "--bind", "127.0.0.1", str(port))
    try:
        wait_for("listener", lambda: ct.run("bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}",
                                            check=False).returncode == 0, timeout=30)
        probe = ssh(ct, f"timeout 10 bash -c 'echo > /dev/tcp/10.0.2.2/{port}' 2>&1; "
                        "echo rc=$?", check=False).stdout
    finally:
        ct.systemctl("stop", "probe-listener", check=False)
    assert "Connection refused" in probe and "rc=0" not in probe, probe
    # The secrets: on no command line, in no journal entry, in no file left in the unit's dirs.
    cmdlines = ct.run("sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
    assert "qemu-system" in cmdlines and "opt/io.systemd.credentials/test.set" in cmdlines
    for secret in (SET_SECRET, LOAD_SECRET):
        assert secret not in cmdlines
        assert secret not in ct.journal("-b", "-o", "verbose")
        found = ct.run("grep", "-rl", secret, "/run/qemu-run", "/var/lib/qemu-run", check=False)
        assert found.stdout == "", found.stdout
    assert ct.run("test", "-e", "/run/qemu-run/cloud/credentials", check=False).returncode == 1
    # The overlay is the VM's; the seed is in the runtime directory.
    ct.run("test", "-f", "/var/lib/qemu-run/cloud/image.qcow2")
    ct.run("test", "-f", "/run/qemu-run/cloud/seed.iso")


def test_reset_refused_while_running(ct: Container) -> None:
    proc = reset(ct, "cloud", check=False)
    assert proc.returncode == 1
    assert "VM cloud is running: stop it first" in proc.stderr
    ct.run("test", "-f", "/var/lib/qemu-run/cloud/image.qcow2")


def test_restart_keeps_guest_state_and_stops_via_agent(ct: Container) -> None:
    unit = "qemu-run@cloud.service"
    ct.systemctl("restart", unit, timeout=BOOT_TIMEOUT + 300)
    log = runner_log(ct, "cloud")
    assert "Asked the guest to shut down (agent)" in log
    assert "VM cloud stopped: the guest powered off" in log
    assert "Shutdown via agent failed" not in log  # retries do not ask the departed agent
    assert prop(ct, unit, "ActiveState") == "active"
    wait_ssh(ct)
    assert ssh(ct, "cat marker").stdout.strip() == "kept"
    assert host_key(ct) == SEEN["host key"]  # the same instance: no first boot
    # The same TPM: the sealed secret decrypts.
    assert ssh(ct, "sudo systemd-creds decrypt --name=qemu-unit-test /mnt/data/secret.cred -"
               ).stdout == TPM_SECRET


def test_reset_gives_first_boot_again(ct: Container) -> None:
    unit = "qemu-run@cloud.service"
    ct.systemctl("stop", unit, timeout=400)
    assert prop(ct, unit, "Result") == "success"
    assert qemu_pids(ct, "cloud") == []
    proc = reset(ct, "cloud")
    assert "image.qcow2" in proc.stderr and "cloud_VARS.fd" in proc.stderr
    assert "/var/lib/qemu-run/cloud/lib/swtpm" in proc.stderr
    start_and_wait_ready(ct, "cloud")
    wait_ssh(ct)
    assert ssh(ct, "test -e marker", check=False).returncode == 1
    # cloud-init treated it as a first boot: new SSH host keys.
    assert host_key(ct) != SEEN["host key"]
    # A new TPM: the secret sealed to the old one, still on the share, no longer decrypts.
    assert ssh(ct, "cat /mnt/data/hello").stdout == "hello from the host\n"
    unsealed = ssh(ct, "sudo systemd-creds decrypt --name=qemu-unit-test "
                       "/mnt/data/secret.cred - 2>&1", check=False)
    assert unsealed.returncode != 0 and TPM_SECRET not in unsealed.stdout, unsealed.stdout
    ct.systemctl("stop", unit, timeout=400)


def test_ephemeral_overlay_is_discarded(ct: Container) -> None:
    unit = "qemu-run@eph.service"
    ct.systemctl("start", unit)
    ct.run("test", "-f", "/run/qemu-run/eph/image.qcow2")
    ct.systemctl("stop", unit)
    assert ct.run("test", "-e", "/run/qemu-run/eph/image.qcow2", check=False).returncode == 1
    assert ct.run("test", "-e", "/var/lib/qemu-run/eph/image.qcow2", check=False).returncode == 1


def _fails_with(ct: Container, vm: str, text: str) -> None:
    unit = f"qemu-run@{vm}.service"
    ct.systemctl("start", unit, check=False)
    wait_for("failure", lambda: prop(ct, unit, "ActiveState") == "failed", timeout=60)
    assert prop(ct, unit, "ExecMainStatus") == "78"
    errors = ct.journal("-u", unit, "-t", "qemu-unit", "-p", "err", "-o", "cat").splitlines()
    assert errors == [text], errors


def test_missing_base_image_is_one_clear_line(ct: Container) -> None:
    _fails_with(ct, "nobase",
                f"/etc/qemu-run/nobase.vm:2: Image=: {DATA}/missing.qcow2 does not exist")


def test_unreadable_key_file_is_one_clear_line(ct: Container) -> None:
    _fails_with(ct, "nokey", f"/etc/qemu-run/nokey.vm:5: SSHAuthorizedKey=: "
                             f"{DATA}/root-only.pub is not readable")


def test_taken_host_port_is_one_clear_line(ct: Container) -> None:
    listener = subprocess.Popen(
        ["nsenter", "-t", str(ct.leader), "-a", "/usr/bin/python3", "-c",
         f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{TAKEN_PORT})); "
         "s.listen(); print('listening', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        _fails_with(ct, "taken", f"/etc/qemu-run/taken.vm:5: PublishPort=: host port "
                                 f"127.0.0.1:{TAKEN_PORT}/tcp is not available: "
                                 "Address already in use")
    finally:
        listener.kill()
        listener.wait()


def test_bad_value_exits_78(ct: Container) -> None:
    _fails_with(ct, "badkey", "/etc/qemu-run/badkey.vm:3: PublishPort=: invalid host port "
                              "'127.0.0.1': expected a number from 1 to 65535")


def _console_until(ct: Container, vm: str, text: str) -> str:
    """Start VM, return its console up to the line holding TEXT, stop it."""
    unit = f"qemu-run@{vm}.service"
    ct.systemctl("start", unit)
    of = prop(ct, unit, "InvocationID")
    lines = ct.wait_journal(text, f"_SYSTEMD_INVOCATION_ID={of}", "-t", "qemu-unit-console",
                            "-o", "cat", timeout=300)
    ct.systemctl("stop", unit)
    return lines


def test_secure_boot_refuses_an_unsigned_boot_loader(ct: Container) -> None:
    # OVMF with Microsoft's keys enrolled (SecureBoot=yes) finds the ESP's boot loader,
    # unsigned systemd-boot, and refuses to run it: nothing of the guest's OS starts.
    lines = _console_until(ct, "locked", "Access Denied")
    refused = [line for line in lines.splitlines() if "Access Denied" in line]
    print(f"\nSecure Boot: {refused[0].strip()}")
    assert "failed to load" in refused[0], lines
    assert "Linux version" not in lines and "systemd-boot" not in lines, lines


def test_secure_boot_boots_a_signed_chain(ct: Container) -> None:
    # Debian's signed shim (Microsoft's key), GRUB and kernel (Debian's key, which shim
    # trusts) under SecureBoot=yes: the chain runs and the guest's kernel reports Secure
    # Boot on. Up to the kernel's first lines only: the rest is the image's usual boot.
    lines = _console_until(ct, "signed", "secureboot: Secure boot enabled")
    assert "Welcome to GRUB!" in lines, lines  # shim verified and started GRUB
    assert "EFI stub: UEFI Secure Boot is enabled." in lines, lines
    assert "Kernel is locked down from EFI Secure Boot" in lines, lines


def test_leaves_no_qemu(ct: Container) -> None:
    assert qemu_pids(ct) == []
