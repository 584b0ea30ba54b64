"""The CRCs object stores publish (S3 additional checksums, GCS ``crc32c``), computed per
range as the bytes arrive and joined in file order, so a file is verified at CRC speed
(~10x a sha256) without a second read. Native code from awscrt, which releases the GIL."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from awscrt import checksums

__all__ = [
    "CRCS",
    "Crc",
    "CrcFold",
    "Published",
    "ReadBack",
    "checks_applied",
    "crc_from_base64",
    "describe_checks",
]

ReadBack = Callable[[Callable[[memoryview], None]], None]
"""``read_back(feed)``: feed a part's bytes, already on disk, to ``feed`` in order."""


@dataclass(frozen=True)
class Crc:
    """One CRC algorithm: ``update(data, crc)``, ``combine(crc_a, crc_b, len_b)``."""

    name: str
    update: Callable[[bytes | memoryview, int], int]
    combine: Callable[[int, int, int], int]
    bits: int

    def hex(self, value: int) -> str:
        """``value`` as fixed-width hex, as recorded in a manifest."""
        return f"{value:0{self.bits // 4}x}"


CRCS: dict[str, Crc] = {
    "crc64nvme": Crc("crc64nvme", checksums.crc64nvme, checksums.combine_crc64nvme, 64),
    "crc32c": Crc("crc32c", checksums.crc32c, checksums.combine_crc32c, 32),
    "crc32": Crc("crc32", checksums.crc32, checksums.combine_crc32, 32),
}
"""Cheapest first: the order a source prefers them in when it publishes several."""


def crc_from_base64(name: str, value: str) -> tuple[str, int] | None:
    """``(name, crc)`` from a published base64 big-endian CRC; None when ``value`` is not
    one (a composite checksum ``...-N`` of a multipart upload, a wrong width)."""
    crc = CRCS.get(name)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if crc is None or len(raw) != crc.bits // 8:
        return None
    return name, int.from_bytes(raw, "big")


@dataclass
class CrcFold:
    """One file checked by the source's CRC: each part folds its own CRC as its bytes
    arrive, in any order, and the parts' CRCs are joined in file order."""

    crc: Crc
    published: int
    parts: dict[int, int] = field(default_factory=dict)
    """CRC of each part received in this run, by part index."""
    total: int = 0
    """CRC of the file's prefix joined so far."""

    def join(self, index: int, length: int, read_back: ReadBack) -> None:
        """Join part ``index`` (``length`` bytes) after the prefix; a part kept from an
        earlier run (its CRC unknown) is computed by ``read_back`` from disk, once."""
        value = self.parts.pop(index, None)
        if value is None:
            state = [0]

            def feed(chunk: memoryview) -> None:
                state[0] = self.crc.update(chunk, state[0])

            read_back(feed)
            value = state[0]
        self.total = self.crc.combine(self.total, value, length)

    def outcome(self) -> tuple[str, str]:
        """``(computed, published)`` as hex: equal when the file is intact."""
        return self.crc.hex(self.total), self.crc.hex(self.published)


class Published(Protocol):
    """What a listed file publishes about its bytes (:class:`~.sources.base.RemoteFile`)."""

    size: int | None
    crc: tuple[str, int] | None
    md5: str | None
    sha256: str | None
    git_sha1: str | None


def checks_applied(remote: Published, verify_md5: bool = True) -> list[str]:
    """The published checks the fetcher compares ``remote``'s bytes with, in one place for
    the fetcher and for status: its CRC alone where it has one, else its MD5, sha256 and
    git blob sha1 as published; none (``[]``) means size only."""
    if remote.crc and remote.crc[0] in CRCS and remote.size is not None:
        return [remote.crc[0]]
    names = []
    if verify_md5 and remote.md5:
        names.append("MD5")
    if remote.sha256:
        names.append("sha256")
    if remote.git_sha1 and remote.size is not None:
        names.append("git blob sha1")
    return names


def describe_checks(files: list[Published], publisher: str) -> str:
    """For status, how ``files`` are checked: e.g. ``crc64nvme published by S3``, or size
    with the sha256 recorded at first download where ``publisher`` gives nothing."""
    counts: dict[str, int] = {}
    for f in files:
        key = " + ".join(checks_applied(f)) or ""
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        what = (
            f"{key} published by {publisher}" if key else "size; sha256 recorded at first download"
        )
        parts.append(what if len(counts) == 1 else f"{what} ({n} of {len(files)} files)")
    return "; ".join(parts) or "nothing listed yet"
