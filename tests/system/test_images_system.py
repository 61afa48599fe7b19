"""Image= URLs under the real unit: qemu-run-pull@KEY.service pulls from a loopback HTTP
server (this test's, on the host's 127.0.0.1, which the container shares) into the
shared cache, VMs starting together wait for one download, a bad image fails the start
and leaves nothing, and the suite's Debian image boots from a compressed, signed URL.

The tiny busybox guest (Kernel=) carries the claims about the pull (the overlay's base is
the cached blob); the Debian guest the claim that a pulled image boots.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from tests.support.container import Container
from tests.support.debian import build_debian_image
from tests.support.imageserver import GPG, ImageServer, signing_key, sums_line
from tests.support.vm import (
    install_qemu_unit,
    prop,
    put_file,
    qemu_pids,
    runner_log,
    stage_guest,
    vm_text,
    wait_for,
)

pytestmark = pytest.mark.system

CACHE = "/var/lib/qemu-run/images"
FIVE = [f"pull{i}" for i in range(5)]
BOOT_TIMEOUT = 900


def small_qcow2(tmp: Path, name: str) -> bytes:
    path = tmp / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    # Some payload, so that a download takes a few chunks (the slow server shows progress).
    with open(path, "ab") as f:
        f.write(hashlib.sha256(name.encode()).digest() * (6 << 20 >> 5))
    return path.read_bytes()


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def ct(qemu_unit_bin: Path, server: ImageServer,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    with Container("images", stage_guest, stop_timeout=30) as ct:
        install_qemu_unit(ct, qemu_unit_bin)
        ct.systemctl("daemon-reload")
        yield ct


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write(ct: Container, name: str, text: str) -> None:
    put_file(ct, f"/etc/qemu-run/{name}.vm", text)


def image_list(ct: Container, qemu_unit_bin: Path) -> list[dict[str, object]]:
    out = ct.run(str(qemu_unit_bin), "image", "list", "--json").stdout
    return list(json.loads(out)["images"])


def test_five_vms_started_together_download_once(ct: Container, server: ImageServer,
                                                  qemu_unit_bin: Path,
                                                  tmp_path: Path) -> None:
    data = small_qcow2(tmp_path, "five.qcow2")
    server.files["/five.qcow2"] = data
    server.chunk_delay = 0.3  # ~2 s in flight: the VMs wait and show it
    for name in FIVE:
        write(ct, name, vm_text("wait", vm=f"Image={server.url('/five.qcow2')}\n"
                                           f"ImageChecksum={sha256(data)}\nEphemeral=yes"))
    ct.systemctl("daemon-reload")
    units = [f"qemu-run@{n}.service" for n in FIVE]
    ct.systemctl("start", "--no-block", *units)
    # While the pull runs, the waiting VM's STATUS= shows bytes and percent.
    status = wait_for("a waiting VM's STATUS=", lambda: (
        s if "%" in (s := prop(ct, units[0], "StatusText")) else None), timeout=120)
    assert status.startswith("Waiting for the image: ") and "MiB" in status
    for unit in units:
        wait_for(f"{unit} active", lambda u=unit: prop(ct, u, "ActiveState") == "active",
                 timeout=300)
    server.chunk_delay = 0.0
    assert server.requests["/five.qcow2"] == 1
    # Each start waited for the pull: none failed and was restarted on the way.
    assert [prop(ct, u, "NRestarts") for u in units] == ["0"] * 5
    blob = f"{CACHE}/blobs/sha256-{hashlib.sha256(data).hexdigest()}"
    # The cache: the pulling user's, read-only to VMs; nothing left in tmp/.
    owner, mode = ct.run("stat", "-c", "%U %a", blob).stdout.split()
    assert (owner, mode) == ("qemu-run-pull", "444")
    assert ct.run("ls", "-A", f"{CACHE}/tmp").stdout == ""
    # Each VM's overlay is backed by the cached blob.
    for name in FIVE:
        info = ct.run("qemu-img", "info", "--output=json", "-U",
                      f"/run/qemu-run/{name}/image.qcow2").stdout
        assert json.loads(info)["backing-filename"] == blob
    (entry,) = [e for e in image_list(ct, qemu_unit_bin) if e["path"] == blob]
    assert entry["vms"] == FIVE and entry["sources"] == [server.url("/five.qcow2")]
    ct.systemctl("stop", *units)
    assert qemu_pids(ct) == []


def test_a_tampered_image_fails_the_start_and_leaves_nothing(ct: Container,
                                                             server: ImageServer,
                                                             tmp_path: Path) -> None:
    data = small_qcow2(tmp_path, "tampered.qcow2")
    server.files["/tampered.qcow2"] = data[:-1] + b"!"
    write(ct, "tampered", vm_text("wait", vm=f"Image={server.url('/tampered.qcow2')}\n"
                                             f"ImageChecksum={sha256(data)}"))
    ct.systemctl("daemon-reload")
    unit = "qemu-run@tampered.service"
    ct.systemctl("start", unit, check=False)
    wait_for("the failed start", lambda: prop(ct, unit, "ActiveState") == "failed", timeout=120)
    assert "digest mismatch" in runner_log(ct, "tampered")
    # Fails once (EX_CONFIG): a restart would only pull the same wrong bytes again.
    assert prop(ct, unit, "ExecMainStatus") == "78"
    assert prop(ct, unit, "NRestarts") == "0"
    blobs = ct.run("ls", "-A", f"{CACHE}/blobs").stdout.split()
    assert f"sha256-{hashlib.sha256(data[:-1] + b'!').hexdigest()}" not in blobs
    assert ct.run("ls", "-A", f"{CACHE}/tmp").stdout == ""
    ct.systemctl("reset-failed", unit, check=False)


def test_debian_boots_from_a_compressed_signed_url(ct: Container, server: ImageServer,
                                                   qemu_unit_bin: Path,
                                                   tmp_path: Path) -> None:
    image = build_debian_image()
    packed = tmp_path / "debian.qcow2.zst"
    with open(image.disk, "rb") as src, open(packed, "wb") as dst:
        zstandard.ZstdCompressor(level=1, threads=-1).copy_stream(src, dst)
    with open(image.disk, "rb") as f:
        raw_sum = hashlib.file_digest(f, "sha256").hexdigest()
    # The publisher's sums name the decompressed image (what is checked after zstd).
    sums = f"{raw_sum}  debian.qcow2\n".encode()
    with signing_key(tmp_path / "gnupg") as env:
        signature = subprocess.run([*GPG, "--detach-sign"], input=sums, env=env, check=True,
                                   capture_output=True).stdout
        keyring = subprocess.run(["gpg", "--batch", "--export"], env=env, check=True,
                                 capture_output=True).stdout
    server.files |= {"/debian/debian.qcow2.zst": packed, "/debian/SHA256SUMS": sums,
                     "/debian/SHA256SUMS.gpg": signature}
    ct.run("sh", "-c", "mkdir -p /etc/qemu-unit-test && base64 -d > /etc/qemu-unit-test/keys.gpg",
           input=base64.b64encode(keyring).decode())
    write(ct, "debian", f"""\
[VM]
Image={server.url('/debian/debian.qcow2.zst')}
ImageChecksums={server.url('/debian/SHA256SUMS')}
ImageSignature={server.url('/debian/SHA256SUMS.gpg')}
ImageKeyring=/etc/qemu-unit-test/keys.gpg
Ephemeral=yes
Firmware=uefi
Accel=tcg
Memory=1G
Network=none
Ready=agent
ShutdownMode=agent acpi
ShutdownTimeout=300s

[Service]
TimeoutStartSec={BOOT_TIMEOUT}
""")
    ct.systemctl("daemon-reload")
    unit = "qemu-run@debian.service"
    ct.systemctl("start", unit, timeout=BOOT_TIMEOUT + 60)
    assert prop(ct, unit, "ActiveState") == "active"
    blob = f"{CACHE}/blobs/sha256-{raw_sum}"
    assert ct.run("sha256sum", blob).stdout.split()[0] == raw_sum
    assert server.requests["/debian/debian.qcow2.zst"] == 1
    ct.systemctl("stop", unit, timeout=400)
    assert qemu_pids(ct) == []


def overlay_base(ct: Container, name: str) -> str:
    info = ct.run("qemu-img", "info", "--output=json", "-U",
                  f"/run/qemu-run/{name}/image.qcow2").stdout
    return str(json.loads(info)["backing-filename"])


def test_auto_update_moves_an_ephemeral_vm_and_rolls_back_a_bad_image(
        ct: Container, server: ImageServer, qemu_unit_bin: Path, tmp_path: Path) -> None:
    v1, v2 = small_qcow2(tmp_path, "v1.qcow2"), small_qcow2(tmp_path, "v2.qcow2")
    # v3 passes every check of the pull but QEMU cannot open it (cluster_bits 99).
    v3 = v2[:20] + (99).to_bytes(4, "big") + v2[24:]

    def publish(data: bytes) -> None:
        server.files |= {"/au/disk.qcow2": data,
                         "/au/SHA256SUMS": sums_line(data, "disk.qcow2").encode()}

    publish(v1)
    write(ct, "au", vm_text("wait", vm=f"Image={server.url('/au/disk.qcow2')}\n"
                                       f"ImageChecksums={server.url('/au/SHA256SUMS')}\n"
                                       "Ephemeral=yes\nAutoUpdate=yes"))
    ct.systemctl("daemon-reload")
    unit = "qemu-run@au.service"
    ct.systemctl("start", unit)
    assert overlay_base(ct, "au") == f"{CACHE}/blobs/sha256-{hashlib.sha256(v1).hexdigest()}"

    publish(v2)
    dry = ct.run(str(qemu_unit_bin), "auto-update", "--dry-run").stdout
    assert f"would update au: {server.url('/au/disk.qcow2')} -> {sha256(v2)}" in dry
    first = prop(ct, unit, "InvocationID")
    ct.run(str(qemu_unit_bin), "auto-update")
    assert prop(ct, unit, "ActiveState") == "active" and prop(ct, unit, "InvocationID") != first
    assert overlay_base(ct, "au") == f"{CACHE}/blobs/sha256-{hashlib.sha256(v2).hexdigest()}"

    publish(v3)
    bad = ct.run(str(qemu_unit_bin), "auto-update", check=False)
    assert bad.returncode == 1
    assert f"au did not become ready on {sha256(v3)}: rolling back to {sha256(v2)}" in bad.stderr
    assert prop(ct, unit, "ActiveState") == "active"
    assert overlay_base(ct, "au") == f"{CACHE}/blobs/sha256-{hashlib.sha256(v2).hexdigest()}"
    ref = ct.run("sh", "-c", f"cat {CACHE}/refs/*.json").stdout
    assert f'"digest": "{sha256(v2)}"' in ref
    # The next timer run: the sums still name v3, which failed; the VM is left alone.
    before = prop(ct, unit, "InvocationID")
    again = ct.run(str(qemu_unit_bin), "auto-update", check=False)
    assert again.returncode == 0, again.stderr
    assert f"au stays on {sha256(v2)}" in again.stderr
    assert prop(ct, unit, "InvocationID") == before
    ref = ct.run("sh", "-c", f"cat {CACHE}/refs/*.json").stdout
    assert f'"digest": "{sha256(v2)}"' in ref and f'"rejected": "{sha256(v3)}"' in ref
    ct.systemctl("stop", unit)
    assert qemu_pids(ct) == []


def test_a_full_disk_leaves_nothing_but_one_line(server: ImageServer, tmp_path: Path) -> None:
    """A cache on a 4 MiB tmpfs, an 8 MiB image: the pull fails with one line, keeps nothing."""
    from qemu_unit.config.imagesource import ImageSource
    from qemu_unit.errors import QemuUnitError
    from qemu_unit.images import fetch
    from qemu_unit.images.cache import Cache
    from qemu_unit.images.pull import pull

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        data = os.urandom(8 << 20)
        server.files["/big.raw"] = data
        cache = Cache(mnt / "images")
        with pytest.raises(QemuUnitError) as e:
            pull(ImageSource(server.url("/big.raw"), checksum=sha256(data)), cache,
                 retry=fetch.Retry(attempts=2, backoff=0.01, timeout=10))
        assert str(e.value) == (f"no space left in {cache.root} while pulling "
                                f"{server.url('/big.raw')}: nothing kept")
        assert list(cache.blobs.iterdir()) == [] and list(cache.tmp.iterdir()) == []
        assert server.requests["/big.raw"] == 1  # a full disk is not retried
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
