"""What vouches for an image: a checksum, a sums file, a gpgv-checked signature.

A sums file is read as Debian, Ubuntu and Fedora publish them: GNU coreutils lines
(`HEX  NAME`, `HEX *NAME`) or BSD tag lines (`SHA256 (NAME) = HEX`), optionally
inside an OpenPGP clear-signed message (Fedora's CHECKSUM). The entry for the
image is the one for the URL's file name (the bytes as downloaded) or, for a
compressed download, for the name without .xz/.gz/.zst (the bytes after
decompression): whichever the publisher listed is what is checked.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qemu_unit import command
from qemu_unit.config.imagesource import (
    COMPRESSED_SUFFIXES,
    DIGEST_ALGORITHMS,
    ImageSource,
    parse_checksum,
)
from qemu_unit.errors import QemuUnitError

_GNU_LINE = re.compile(r"([0-9a-fA-F]{64}|[0-9a-fA-F]{128}) [ *](.+)")
_BSD_LINE = re.compile(r"(SHA256|SHA512) \((.+)\) ?= ?([0-9a-fA-F]+)")
_CLEARSIGN_BEGIN = "-----BEGIN PGP SIGNED MESSAGE-----"
_SIGNATURE_BEGIN = "-----BEGIN PGP SIGNATURE-----"


class VerificationError(QemuUnitError):
    """The bytes are not the ones vouched for: nothing is kept."""


@dataclass(frozen=True)
class Expected:
    """The digest an image must have, and whether it covers the download or its content."""

    algorithm: str
    hexdigest: str
    decompressed: bool | None  # None: either (a checksum given by hand names no file)
    origin: str  # for messages: "ImageChecksum=" or the sums file and entry

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def signed_text(text: str) -> str:
    """The body of a clear-signed message (dash-escaping undone); TEXT itself otherwise."""
    if not text.lstrip().startswith(_CLEARSIGN_BEGIN):
        return text
    lines = text.lstrip().splitlines()
    try:
        start = lines.index("") + 1  # after the Hash: armor headers
        end = lines.index(_SIGNATURE_BEGIN)
    except ValueError:
        raise VerificationError("a clear-signed sums file without its signature") from None
    return "\n".join(line[2:] if line.startswith("- ") else line for line in lines[start:end])


def parse_sums(text: str) -> dict[str, tuple[str, str]]:
    """{file name: (algorithm, hex)} of a SHA256SUMS/SHA512SUMS/CHECKSUM file."""
    sums: dict[str, tuple[str, str]] = {}
    for raw in signed_text(text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _GNU_LINE.fullmatch(line):
            hexdigest, name = m.group(1).lower(), m.group(2)
            algorithm = "sha256" if len(hexdigest) == 64 else "sha512"
        elif (m := _BSD_LINE.fullmatch(line)) and len(m.group(3)) == DIGEST_ALGORITHMS[
            m.group(1).lower()
        ]:
            algorithm, name, hexdigest = m.group(1).lower(), m.group(2), m.group(3).lower()
        else:
            continue  # other lines (sizes, comments of other tools) name no digest
        sums[name.removeprefix("./")] = (algorithm, hexdigest)
    return sums


def decompressed_name(name: str) -> str | None:
    """NAME without its compression suffix; None when it names no compressed file."""
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def expected_from_sums(src: ImageSource, text: str) -> Expected:
    """The entry of SRC's image in the sums file TEXT; VerificationError if none."""
    sums = parse_sums(text)
    name = src.file_name
    if name in sums:
        algorithm, hexdigest = sums[name]
        return Expected(algorithm, hexdigest, False, f"{src.checksums} ({name})")
    inner = decompressed_name(name)
    if inner is not None and inner in sums:
        algorithm, hexdigest = sums[inner]
        return Expected(algorithm, hexdigest, True, f"{src.checksums} ({inner})")
    raise VerificationError(f"{src.checksums} lists no {name}"
                            + (f" or {inner}" if inner else ""))


def expected_from_checksum(checksum: str) -> Expected:
    algorithm, hexdigest = parse_checksum(checksum)
    return Expected(algorithm, hexdigest, None, "ImageChecksum=")


def verify_signature(data: Path, signature: Path | None, keyring: Path) -> None:
    """gpgv: DATA signed (detached SIGNATURE, or clear-signed when None) by a key in KEYRING."""
    if not keyring.is_file():
        raise VerificationError(f"keyring {keyring} does not exist")
    with tempfile.TemporaryDirectory(prefix="qemu-unit-gpgv-") as home:
        # gpgv reads no configuration of the caller's; a keyring path with a slash is
        # used as is (a bare name would be looked up in GNUPGHOME).
        cmd = ["gpgv", "--homedir", home, "--keyring", os.path.abspath(keyring)]
        cmd += [os.fspath(signature), os.fspath(data)] if signature else [os.fspath(data)]
        try:
            command.run(cmd, "gpgv")
        except command.CommandError as e:
            if not e.detail:
                raise QemuUnitError(f"{e} (Debian package gpgv)") from None
            detail = " ".join(line.removeprefix("gpgv: ") for line in e.detail.splitlines()
                              if "BAD signature" in line or "Can't check" in line
                              or "no valid OpenPGP" in line or "No public key" in line)
            raise VerificationError(f"the signature of {data.name} does not verify against "
                                    f"{keyring}: {detail or e.detail}") from None
