"""Image pulls against a loopback HTTP server: verification, sums files, signatures,
compressed formats, resume, retries, and a cache that keeps nothing unverified."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from qemu_unit.config.imagesource import ImageSource
from qemu_unit.errors import ConfigError, QemuUnitError
from qemu_unit.images import fetch, verify
from qemu_unit.images.cache import Cache
from qemu_unit.images.pull import pull
from qemu_unit.images.verify import VerificationError
from tests.support.imageserver import GPG, ImageServer, signing_key, sums_line

FAST = fetch.Retry(attempts=4, backoff=0.01, timeout=5)


def qcow2_like(size: int = 3 << 20, seed: int = 1) -> bytes:
    """A qcow2 header without a backing file, then bytes that do not compress to nothing."""
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(8) + bytes(4) + bytes(4)
    header += (size).to_bytes(8, "big")
    header += bytes(104 - len(header))  # version 3: no incompatible features
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    return (header + body)[:size]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "images")


def cache_files(cache: Cache) -> list[str]:
    """Everything a VM could see, and leftovers in tmp/."""
    return sorted(str(p.relative_to(cache.root)) for d in (cache.blobs, cache.tmp)
                  if d.exists() for p in d.iterdir())


# -- the source and the sums file ---------------------------------------------------------


def test_a_url_without_verification_is_refused_unless_said():
    with pytest.raises(ConfigError, match="ImageVerify=no"):
        ImageSource("https://example.invalid/a.qcow2").check()
    ImageSource("https://example.invalid/a.qcow2", verify=False).check()


@pytest.mark.parametrize("bad", ["md5:00", "sha256:xyz", "sha256:" + "0" * 63, "0" * 64])
def test_bad_checksums_are_refused(bad: str):
    with pytest.raises(ConfigError, match="invalid checksum"):
        ImageSource("https://h/a.img", checksum=bad).check()


def test_a_signature_needs_a_keyring_and_a_sums_file():
    with pytest.raises(ConfigError, match="ImageKeyring"):
        ImageSource("https://h/a", checksums="https://h/S", signature="https://h/S.gpg").check()
    with pytest.raises(ConfigError, match="ImageChecksums"):
        ImageSource("https://h/a", checksum="sha256:" + "0" * 64,
                    signature="https://h/S.gpg", keyring=Path("/k")).check()


def test_the_key_depends_on_every_field():
    a = ImageSource("https://h/a", checksum="sha256:" + "0" * 64)
    assert a.key() == ImageSource("https://h/a", checksum="sha256:" + "0" * 64).key()
    assert a.key() != ImageSource("https://h/a", checksum="sha256:" + "1" * 64).key()
    assert len(a.key()) == 16


def test_sums_files_as_distributions_publish_them():
    h256, h512 = "a" * 64, "b" * 128
    text = (f"{h256}  debian.qcow2\n{h512} *fedora.raw.xz\n# comment\n"
            f"SHA256 (Fedora-Cloud.qcow2) = {h256}\nnot a line\n{h256}  ./sub.img\n")
    sums = verify.parse_sums(text)
    assert sums == {"debian.qcow2": ("sha256", h256), "fedora.raw.xz": ("sha512", h512),
                    "Fedora-Cloud.qcow2": ("sha256", h256), "sub.img": ("sha256", h256)}


def test_clear_signed_sums_are_read_inside_the_signature():
    text = ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
            f"SHA256 (x.qcow2) = {'c' * 64}\n- -dash line\n"
            "-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n")
    assert verify.parse_sums(text) == {"x.qcow2": ("sha256", "c" * 64)}


def test_the_entry_names_the_download_or_its_decompressed_content():
    text = f"{'1' * 64}  a.raw.xz\n{'2' * 64}  b.raw\n"
    a = verify.expected_from_sums(ImageSource("http://h/d/a.raw.xz", checksums="http://h/S"), text)
    assert (a.hexdigest, a.decompressed) == ("1" * 64, False)
    b = verify.expected_from_sums(ImageSource("http://h/b.raw.zst", checksums="http://h/S"), text)
    assert (b.hexdigest, b.decompressed) == ("2" * 64, True)
    with pytest.raises(VerificationError, match="lists no c.raw"):
        verify.expected_from_sums(ImageSource("http://h/c.raw", checksums="http://h/S"), text)


# -- pulls ----------------------------------------------------------------------------------


def test_pull_with_a_checksum_publishes_a_read_only_blob(server: ImageServer, cache: Cache):
    data = qcow2_like()
    server.files["/img.qcow2"] = data
    src = ImageSource(server.url("/img.qcow2"), checksum=sha256(data))
    ref = pull(src, cache, retry=FAST)
    blob = cache.blob(ref.digest)
    assert ref.digest == sha256(data) and ref.format == "qcow2" and ref.size == len(data)
    assert blob.read_bytes() == data
    assert blob.stat().st_mode & 0o777 == 0o444
    assert cache.tmp.stat().st_mode & 0o777 == 0o700
    assert cache_files(cache) == [f"blobs/{blob.name}"]
    # A second pull of the same source fetches nothing.
    assert pull(src, cache, retry=FAST) == ref
    assert server.requests["/img.qcow2"] == 1


def test_pull_with_a_sha512_sums_file(server: ImageServer, cache: Cache):
    data = qcow2_like(seed=2)
    server.files["/d/disk.qcow2"] = data
    server.files["/d/SHA512SUMS"] = sums_line(data, "disk.qcow2", "sha512").encode()
    ref = pull(ImageSource(server.url("/d/disk.qcow2"), checksums=server.url("/d/SHA512SUMS")),
               cache, retry=FAST)
    assert cache.blob(ref.digest).read_bytes() == data
    assert ref.verified.startswith("sha512:")


@pytest.mark.parametrize("suffix,compress", [
    (".xz", lzma.compress), (".gz", gzip.compress),
    (".zst", lambda d: zstandard.ZstdCompressor().compress(d)),
])
@pytest.mark.parametrize("covers", ["download", "content"])
def test_compressed_images_are_decompressed_and_checked_as_published(
        server: ImageServer, cache: Cache, suffix, compress, covers):
    data = qcow2_like(seed=3)
    packed = compress(data)
    server.files[f"/img.raw{suffix}"] = packed
    sums = (sums_line(packed, f"img.raw{suffix}") if covers == "download"
            else sums_line(data, "img.raw"))
    server.files["/SHA256SUMS"] = sums.encode()
    ref = pull(ImageSource(server.url(f"/img.raw{suffix}"), checksums=server.url("/SHA256SUMS")),
               cache, retry=FAST)
    assert ref.digest == sha256(data)
    assert cache.blob(ref.digest).read_bytes() == data
    assert cache_files(cache) == [f"blobs/{cache.blob(ref.digest).name}"]


def test_a_tampered_image_leaves_nothing(server: ImageServer, cache: Cache):
    data = qcow2_like(seed=4)
    server.files["/img.qcow2"] = data[:-1] + b"X"
    with pytest.raises(VerificationError, match="digest mismatch"):
        pull(ImageSource(server.url("/img.qcow2"), checksum=sha256(data)), cache, retry=FAST)
    assert cache_files(cache) == []
    assert cache.all_refs() == {}


def test_a_wrong_sums_entry_leaves_nothing(server: ImageServer, cache: Cache):
    data = qcow2_like(seed=5)
    server.files["/img.qcow2"] = data
    server.files["/SHA256SUMS"] = sums_line(b"other", "img.qcow2").encode()
    with pytest.raises(VerificationError, match="digest mismatch"):
        pull(ImageSource(server.url("/img.qcow2"), checksums=server.url("/SHA256SUMS")),
             cache, retry=FAST)
    assert cache_files(cache) == []


@pytest.mark.parametrize("suffix,compress", [
    (".xz", lzma.compress), (".gz", gzip.compress),
    (".zst", lambda d: zstandard.ZstdCompressor().compress(d)),
])
def test_a_truncated_stream_is_refused(server: ImageServer, cache: Cache, suffix, compress):
    packed = compress(qcow2_like(seed=6))[:-100]
    server.files[f"/img.raw{suffix}"] = packed
    with pytest.raises(VerificationError, match="ends early"):
        pull(ImageSource(server.url(f"/img.raw{suffix}"), checksum=sha256(packed)), cache,
             retry=FAST)
    assert cache_files(cache) == []


def test_a_qcow2_with_a_backing_file_is_refused(server: ImageServer, cache: Cache):
    data = bytearray(qcow2_like(seed=7))
    data[8:16] = (512).to_bytes(8, "big")
    server.files["/img.qcow2"] = bytes(data)
    with pytest.raises(VerificationError, match="backing file"):
        pull(ImageSource(server.url("/img.qcow2"), checksum=sha256(bytes(data))), cache,
             retry=FAST)
    assert cache_files(cache) == []


def test_a_dropped_connection_is_resumed_with_a_range(server: ImageServer, cache: Cache):
    data = qcow2_like(size=5 << 20, seed=8)
    server.files["/img.qcow2"] = data
    server.drop_after["/img.qcow2"] = 2 << 20
    ref = pull(ImageSource(server.url("/img.qcow2"), checksum=sha256(data)), cache, retry=FAST)
    assert cache.blob(ref.digest).read_bytes() == data
    assert server.requests["/img.qcow2"] == 2
    (path, first), = server.range_requests
    assert path == "/img.qcow2" and int(first.removeprefix("bytes=").rstrip("-")) >= 1 << 20


def test_a_compressed_download_resumes_too(server: ImageServer, cache: Cache):
    data = os.urandom(3 << 20)
    packed = zstandard.ZstdCompressor().compress(data)
    server.files["/img.raw.zst"] = packed
    server.drop_after["/img.raw.zst"] = len(packed) // 2
    ref = pull(ImageSource(server.url("/img.raw.zst"), checksum=sha256(packed)), cache,
               retry=FAST)
    assert ref.digest == sha256(data) and ref.format == "raw"
    assert len(server.range_requests) == 1


def test_a_partial_file_from_an_earlier_pull_is_resumed(server: ImageServer, cache: Cache):
    data = qcow2_like(size=4 << 20, seed=9)
    server.files["/img.qcow2"] = data
    src = ImageSource(server.url("/img.qcow2"), checksum=sha256(data))
    server.drop_after["/img.qcow2"] = 3 << 20
    server.fail["/img.qcow2"] = 0
    with pytest.raises(fetch.FetchError, match="kept to resume"):
        pull(src, cache, retry=fetch.Retry(attempts=1, backoff=0.01, timeout=5))
    assert cache.blobs.exists() and list(cache.blobs.iterdir()) == []
    pull(src, cache, retry=FAST)
    assert server.range_requests == [("/img.qcow2", f"bytes={3 << 20}-")]


def test_server_errors_are_retried_then_one_line(server: ImageServer, cache: Cache):
    data = qcow2_like(seed=10)
    server.files["/img.qcow2"] = data
    server.fail["/img.qcow2"] = 2
    src = ImageSource(server.url("/img.qcow2"), checksum=sha256(data))
    assert pull(src, cache, retry=FAST).digest == sha256(data)
    assert server.requests["/img.qcow2"] == 3
    server.files["/gone.qcow2"] = data
    server.fail["/gone.qcow2"] = 100
    with pytest.raises(fetch.FetchError) as e:
        pull(ImageSource(server.url("/gone.qcow2"), checksum=sha256(data)), cache, retry=FAST)
    assert "503" in str(e.value) and "4 attempts" in str(e.value) and "\n" not in str(e.value)
    assert server.requests["/gone.qcow2"] == 4


def test_a_missing_file_is_not_retried(server: ImageServer, cache: Cache):
    with pytest.raises(fetch.FetchError, match="404"):
        pull(ImageSource(server.url("/none.qcow2"), verify=False), cache, retry=FAST)
    assert server.requests["/none.qcow2"] == 1


def test_a_server_without_ranges_restarts_from_the_start(server: ImageServer, cache: Cache):
    data = qcow2_like(size=4 << 20, seed=11)
    server.files["/img.qcow2"] = data
    server.ranges = False
    server.drop_after["/img.qcow2"] = 1 << 20
    ref = pull(ImageSource(server.url("/img.qcow2"), checksum=sha256(data)), cache, retry=FAST)
    assert cache.blob(ref.digest).read_bytes() == data


def test_file_urls(tmp_path: Path, cache: Cache):
    data = qcow2_like(seed=12)
    (tmp_path / "a b.qcow2").write_bytes(data)
    ref = pull(ImageSource((tmp_path / "a%20b.qcow2").as_uri().replace("%2520", "%20"),
                           checksum=sha256(data)), cache, retry=FAST)
    assert ref.digest == sha256(data)


def test_concurrent_pulls_of_one_source_download_once(server: ImageServer, cache: Cache):
    data = qcow2_like(size=8 << 20, seed=13)
    server.files["/img.qcow2"] = data
    src = ImageSource(server.url("/img.qcow2"), checksum=sha256(data))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(pull(src, Cache(cache.root),
                                                                   retry=FAST).digest))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [sha256(data)] * 5
    assert server.requests["/img.qcow2"] == 1


def test_an_update_pulls_a_new_digest_and_remembers_the_previous(server: ImageServer,
                                                                   cache: Cache):
    v1, v2 = qcow2_like(seed=14), qcow2_like(seed=15)
    server.files["/img.qcow2"] = v1
    server.files["/SHA256SUMS"] = sums_line(v1, "img.qcow2").encode()
    src = ImageSource(server.url("/img.qcow2"), checksums=server.url("/SHA256SUMS"))
    first = pull(src, cache, retry=FAST)
    assert pull(src, cache, update=True, retry=FAST) == first  # the sums did not change
    assert server.requests["/img.qcow2"] == 1
    server.files["/img.qcow2"] = v2
    server.files["/SHA256SUMS"] = sums_line(v2, "img.qcow2").encode()
    second = pull(src, cache, update=True, retry=FAST)
    assert second.digest == sha256(v2) and second.previous == sha256(v1)
    assert cache.read_ref(src.key()) == second


# -- signatures (a throwaway key made here; gpgv checks it against an exported keyring) ----


@pytest.fixture(scope="module")
def gpg_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(GNUPGHOME holding a secret key, the exported public keyring)."""
    home = tmp_path_factory.mktemp("gnupg")
    with signing_key(home) as env:
        keyring = home / "trusted.gpg"
        exported = subprocess.run(["gpg", "--batch", "--export"], env=env, check=True,
                                  capture_output=True).stdout
        keyring.write_bytes(exported)
        yield home, keyring


def _sign(home: Path, data: bytes, *, clear: bool = False) -> bytes:
    mode = "--clearsign" if clear else "--detach-sign"
    return subprocess.run([*GPG, mode], input=data, env={**os.environ, "GNUPGHOME": str(home)},
                          check=True, capture_output=True).stdout


def test_a_signed_sums_file_is_checked_with_gpgv(server: ImageServer, cache: Cache, gpg_key):
    home, keyring = gpg_key
    data = qcow2_like(seed=16)
    sums = sums_line(data, "img.qcow2").encode()
    server.files |= {"/img.qcow2": data, "/SHA256SUMS": sums,
                     "/SHA256SUMS.gpg": _sign(home, sums)}
    ref = pull(ImageSource(server.url("/img.qcow2"), checksums=server.url("/SHA256SUMS"),
                           signature=server.url("/SHA256SUMS.gpg"), keyring=keyring),
               cache, retry=FAST)
    assert ref.digest == sha256(data)


def test_a_clear_signed_sums_file(server: ImageServer, cache: Cache, gpg_key):
    home, keyring = gpg_key
    data = qcow2_like(seed=17)
    server.files |= {"/img.qcow2": data,
                     "/CHECKSUM": _sign(home, sums_line(data, "img.qcow2").encode(), clear=True)}
    ref = pull(ImageSource(server.url("/img.qcow2"), checksums=server.url("/CHECKSUM"),
                           keyring=keyring), cache, retry=FAST)
    assert ref.digest == sha256(data)


def test_a_bad_signature_fetches_no_image_and_leaves_nothing(server: ImageServer, cache: Cache,
                                                             gpg_key):
    home, keyring = gpg_key
    data = qcow2_like(seed=18)
    sums = sums_line(data, "img.qcow2").encode()
    server.files |= {"/img.qcow2": data, "/SHA256SUMS": sums + b"# changed after signing\n",
                     "/SHA256SUMS.gpg": _sign(home, sums)}
    with pytest.raises(VerificationError, match="does not verify"):
        pull(ImageSource(server.url("/img.qcow2"), checksums=server.url("/SHA256SUMS"),
                         signature=server.url("/SHA256SUMS.gpg"), keyring=keyring),
             cache, retry=FAST)
    assert server.requests["/img.qcow2"] == 0
    assert cache_files(cache) == []


def test_a_signature_by_another_key_is_refused(server: ImageServer, cache: Cache, gpg_key,
                                               tmp_path: Path):
    home, _ = gpg_key
    other = tmp_path / "empty.gpg"
    other.write_bytes(b"")
    data = qcow2_like(seed=19)
    sums = sums_line(data, "img.qcow2").encode()
    server.files |= {"/img.qcow2": data, "/SHA256SUMS": sums,
                     "/SHA256SUMS.gpg": _sign(home, sums)}
    with pytest.raises(VerificationError):
        pull(ImageSource(server.url("/img.qcow2"), checksums=server.url("/SHA256SUMS"),
                         signature=server.url("/SHA256SUMS.gpg"), keyring=other),
             cache, retry=FAST)
    assert cache_files(cache) == []


def test_pull_errors_reach_waiting_units(server: ImageServer, cache: Cache):
    src = ImageSource(server.url("/none.qcow2"), verify=False)
    with pytest.raises(QemuUnitError):
        pull(src, cache, retry=FAST)
    assert "404" in cache.read_progress(src.key())["error"]
    assert cache.read_progress(src.key())["permanent"] is False  # the server may recover


def test_a_wrong_digest_ends_the_waiting_vm_for_good(server: ImageServer, cache: Cache,
                                                    monkeypatch: pytest.MonkeyPatch):
    from types import SimpleNamespace

    from qemu_unit.vm import image

    data = qcow2_like(seed=30)
    server.files["/bad.qcow2"] = data[:-1] + b"!"
    src = ImageSource(server.url("/bad.qcow2"), checksum=sha256(data))
    with pytest.raises(VerificationError):
        pull(src, cache, retry=FAST)
    assert cache.read_progress(src.key())["permanent"] is True
    # The runner under systemd waits for the pull unit's result: exit 78 is in the
    # template's RestartPreventExitStatus=, so no restart pulls the same bytes again.
    monkeypatch.setenv("INVOCATION_ID", "test")
    monkeypatch.setenv("QEMU_UNIT_IMAGES", str(cache.root))
    notify = SimpleNamespace(status=lambda text: None, extend_timeout=lambda s: None)
    with pytest.raises(ConfigError, match="digest mismatch") as failed:
        image.wait_for_pull(SimpleNamespace(image_source=src), notify)  # type: ignore[arg-type]
    assert failed.value.exit_status == 78
    # A server error is not the .vm's fault: the unit's Restart= may try again.
    server.files.pop("/bad.qcow2")
    with pytest.raises(QemuUnitError):
        pull(src, cache, retry=FAST)
    with pytest.raises(QemuUnitError) as failed:
        image.wait_for_pull(SimpleNamespace(image_source=src), notify)  # type: ignore[arg-type]
    assert failed.value.exit_status == 1


# -- image list / prune / rm ----------------------------------------------------------------


def test_list_prune_and_rm_know_which_vms_use_an_image(server: ImageServer, cache: Cache,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    from qemu_unit.cli import images

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # no overlays here
    used, unused = qcow2_like(seed=20), qcow2_like(seed=21)
    server.files |= {"/used.qcow2": used, "/unused.qcow2": unused}
    src = ImageSource(server.url("/used.qcow2"), checksum=sha256(used))
    pull(src, cache, retry=FAST)
    pull(ImageSource(server.url("/unused.qcow2"), checksum=sha256(unused)), cache, retry=FAST)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "web.vm").write_text(f"[VM]\nImage={src.url}\nImageChecksum={src.checksum}\n")
    listed = {e.digest: e for e in images.entries(cache, [conf])}
    assert listed[sha256(used)].vms == ["web"]
    assert listed[sha256(used)].sources == [src.url]
    assert listed[sha256(unused)].vms == []
    assert '"vms": [\n    "web"\n   ]' in images.list_json(list(listed.values()))
    with pytest.raises(QemuUnitError, match="used by web"):
        images.remove(cache, [src.url], [conf])
    assert [e.digest for e in images.prune(cache, [conf], dry_run=True)] == [sha256(unused)]
    assert cache.blob(sha256(unused)).exists()
    images.prune(cache, [conf])
    assert [p.name for p in cache.list_blobs()] == [cache.blob(sha256(used)).name]
    assert images.remove(cache, [sha256(used)[:15]], [conf], force=True) == [sha256(used)]
    assert cache.list_blobs() == [] and cache.all_refs() == {}
