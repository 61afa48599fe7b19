"""Where an Image= URL comes from and how it is verified: the part the generator needs.

Import-light (stdlib only; hashlib on first use): the generator names a VM's
pull unit after `ImageSource.key()` at every boot.
"""

from __future__ import annotations

import re
from pathlib import Path

from qemu_unit.errors import ConfigError
from qemu_unit.records import NamedTuple

URL_SCHEMES = ("https://", "http://", "file://")
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}
# Suffixes of the compressed formats decompressed while downloading.
COMPRESSED_SUFFIXES = (".xz", ".gz", ".zst")


def is_url(value: str) -> bool:
    return value.startswith(URL_SCHEMES)


def parse_checksum(value: str) -> tuple[str, str]:
    """'sha256:HEX' (or sha512) -> (algorithm, lower-case hex); ValueError if not."""
    algorithm, colon, hexdigest = value.partition(":")
    hexdigest = hexdigest.lower()
    length = DIGEST_ALGORITHMS.get(algorithm)
    if not colon or length is None or not re.fullmatch(f"[0-9a-f]{{{length}}}", hexdigest):
        raise ValueError(f"invalid checksum {value!r}: expected sha256:HEX (64 hex digits) "
                         "or sha512:HEX (128)")
    return algorithm, hexdigest


class ImageSource(NamedTuple):
    """An image URL and what vouches for its bytes."""

    url: str
    checksum: str | None = None  # "sha256:HEX" or "sha512:HEX"
    checksums: str | None = None  # URL of a SHA256SUMS/SHA512SUMS file
    signature: str | None = None  # URL of a detached signature of the sums file
    keyring: Path | None = None  # the keys gpgv trusts for it
    verify: bool = True

    def check(self) -> None:
        """ConfigError (key named) for a source that must not be pulled as given."""
        if not is_url(self.url):
            raise ConfigError(f"{self.url!r} is not an https://, http:// or file:// URL",
                              key="Image")
        if self.checksum and self.checksums:
            raise ConfigError("give ImageChecksum= or ImageChecksums=, not both",
                              key="ImageChecksum")
        if self.checksum:
            try:
                parse_checksum(self.checksum)
            except ValueError as e:
                raise ConfigError(str(e), key="ImageChecksum") from None
        for key, value in (("ImageChecksums", self.checksums),
                           ("ImageSignature", self.signature)):
            if value and not is_url(value):
                raise ConfigError(f"{value!r} is not an https://, http:// or file:// URL",
                                  key=key)
        if self.signature and not self.checksums:
            raise ConfigError("a signature is of the sums file: needs ImageChecksums=",
                              key="ImageSignature")
        if self.signature and not self.keyring:
            raise ConfigError("needs ImageKeyring= (the keys gpgv checks it against)",
                              key="ImageSignature")
        if self.keyring and not self.checksums:
            raise ConfigError("needs ImageChecksums= (a signed sums file)", key="ImageKeyring")
        if self.verify and not (self.checksum or self.checksums):
            raise ConfigError(
                "an image URL needs ImageChecksum=, ImageChecksums= or, to boot bytes nobody "
                "vouched for, ImageVerify=no", key="Image")

    @property
    def file_name(self) -> str:
        """The last path component of the URL (what a sums file names)."""
        path = self.url.split("?", 1)[0].split("#", 1)[0]
        return path.rstrip("/").rsplit("/", 1)[-1]

    def as_dict(self) -> dict[str, str | bool | None]:
        return {"url": self.url, "checksum": self.checksum, "checksums": self.checksums,
                "signature": self.signature,
                "keyring": str(self.keyring) if self.keyring else None, "verify": self.verify}

    def key(self) -> str:
        """A short stable name of this source: its pull unit, lock and ref files."""
        import hashlib  # on first use: the generator pays only for VMs with a URL
        import json

        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def pull_arguments(self) -> list[str]:
        """The `qemu-unit image pull` arguments that pull exactly this source."""
        args = [self.url]
        if self.checksum:
            args += ["--checksum", self.checksum]
        if self.checksums:
            args += ["--checksums", self.checksums]
        if self.signature:
            args += ["--signature", self.signature]
        if self.keyring:
            args += ["--keyring", str(self.keyring)]
        if not self.verify:
            args.append("--no-verify")
        return args

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ImageSource:
        keyring = d.get("keyring")
        return cls(url=str(d["url"]), checksum=_opt(d.get("checksum")),
                   checksums=_opt(d.get("checksums")), signature=_opt(d.get("signature")),
                   keyring=Path(str(keyring)) if keyring else None,
                   verify=bool(d.get("verify", True)))


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
