"""The checksums object stores publish, and how the fetcher folds them in.

CRCs (S3 additional checksums, GCS ``crc32c``) are computed per range as the bytes arrive
and joined in file order, so a file is verified at CRC speed (~10x a sha256) without a
second read; native code from awscrt, which releases the GIL. An S3 COMPOSITE checksum
(``<b64>-N``, a multipart upload's CRC of its parts' CRCs) is checked the same way: each
range's CRC is split at the upload parts' boundaries, each upload part's CRC is compared
with the one S3 publishes for it (where it does) and their composite with the object's, so
our ranges need not be aligned with the upload's parts. Hashes that cannot be joined (S3
XXHASH3/XXHASH64/XXHASH128, SHA1) are folded in file order, as a sha256 is."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import xxhash

__all__ = [
    "CRCS",
    "STREAMS",
    "CompositeCrc",
    "Crc",
    "CrcFold",
    "PartCrc",
    "Published",
    "ReadBack",
    "checks_applied",
    "composite_from_base64",
    "crc_from_base64",
    "describe_checks",
    "stream_from_base64",
]

ReadBack = Callable[[Callable[[memoryview], None]], None]
"""``read_back(feed)``: feed a part's bytes, already on disk, to ``feed`` in order."""


@dataclass(frozen=True)
class Crc:
    """One CRC algorithm: ``update(data, crc)``, ``combine(crc_a, crc_b, len_b)``, from
    awscrt, imported on first use: a prefetch that hits the cache never pays its ~0.1-0.3 s
    import."""

    name: str
    bits: int

    def update(self, data: bytes | memoryview, crc: int) -> int:
        return getattr(_awscrt(), self.name)(data, crc)  # type: ignore[no-any-return]

    def combine(self, crc_a: int, crc_b: int, len_b: int) -> int:
        return getattr(_awscrt(), f"combine_{self.name}")(crc_a, crc_b, len_b)  # type: ignore[no-any-return]

    def hex(self, value: int) -> str:
        """``value`` as fixed-width hex, as recorded in a manifest."""
        return f"{value:0{self.bits // 4}x}"


@functools.cache
def _awscrt() -> Any:
    from awscrt import checksums

    return checksums


CRCS: dict[str, Crc] = {
    "crc64nvme": Crc("crc64nvme", 64),
    "crc32c": Crc("crc32c", 32),
    "crc32": Crc("crc32", 32),
}
"""Cheapest first: the order a source prefers them in when it publishes several."""

STREAMS: dict[str, Callable[[], Any]] = {
    "xxhash3": xxhash.xxh3_64,
    "xxhash128": xxhash.xxh3_128,
    "xxhash64": xxhash.xxh64,
    "sha1": lambda: hashlib.sha1(usedforsecurity=False),
}
"""Whole-object hashes S3 publishes that cannot be joined from parts: folded in file order
(the bytes of the part at the frontier as they arrive, later parts read back), cheapest
first. S3's XXHASH values are the big-endian digests xxhash computes (as botocore's
awscrt ``XXHash`` does, checked), seed 0."""


@dataclass(frozen=True)
class CompositeCrc:
    """An S3 COMPOSITE checksum: the CRC of the upload parts' CRCs (big-endian, in order)."""

    name: str
    value: int
    sizes: tuple[int, ...]
    """Each upload part's size, in order (``GetObjectAttributes`` ObjectParts)."""
    parts: tuple[int | None, ...]
    """Each upload part's CRC where S3 lists it (uploads with checksums on AWS), else None."""

    @property
    def cuts(self) -> tuple[int, ...]:
        """The end offset of each upload part."""
        ends, pos = [], 0
        for size in self.sizes:
            pos += size
            ends.append(pos)
        return tuple(ends)


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


class PartCrc:
    """The CRC of one fetched range, folded as its bytes arrive in order, split where an
    upload part of a composite checksum ends inside it (one value per piece)."""

    def __init__(self, crc: Crc, start: int, end: int, cuts: tuple[int, ...] = ()) -> None:
        self.crc = crc
        self.pos = start
        self.ends = [c for c in cuts if start < c < end] + [end]
        self.values = [0]

    def update(self, data: memoryview) -> None:
        """The range's next bytes (at :attr:`pos`)."""
        while len(data):
            i = len(self.values) - 1
            room = self.ends[i] - self.pos
            if room == 0:
                self.values.append(0)
                continue
            piece = data[:room]
            self.values[i] = self.crc.update(piece, self.values[i])
            self.pos += len(piece)
            data = data[len(piece) :]


@dataclass
class CrcFold:
    """One file checked by the source's CRC: each part folds its own CRC as its bytes
    arrive, in any order, and the parts' CRCs are joined in file order; for a composite
    checksum, per upload part, then the composite of those."""

    crc: Crc
    published: int
    layout: CompositeCrc | None = None
    parts: dict[int, list[int]] = field(default_factory=dict)
    """The CRCs (:attr:`PartCrc.values`) of each part received in this run, by index."""
    total: int = 0
    """CRC of what was joined so far (of the current upload part, for a composite)."""
    pos: int = 0
    done: list[int] = field(default_factory=list)
    """The CRC computed of each upload part joined (composite only)."""
    bad: tuple[str, str, str] | None = None
    """The first upload part whose CRC differs from the one S3 lists for it."""

    @property
    def cuts(self) -> tuple[int, ...]:
        return self.layout.cuts if self.layout is not None else ()

    def for_part(self, start: int, end: int) -> PartCrc:
        return PartCrc(self.crc, start, end, self.cuts)

    def join(self, index: int, start: int, end: int, read_back: ReadBack) -> None:
        """Join part ``index`` (``[start, end)``) after the prefix; a part kept from an
        earlier run (its CRC unknown) is computed by ``read_back`` from disk, once."""
        values = self.parts.pop(index, None)
        piece = self.for_part(start, end)
        if values is None:
            read_back(piece.update)
            values = piece.values
        cuts = self.cuts
        for value, piece_end in zip(values, piece.ends, strict=True):
            self.total = self.crc.combine(self.total, value, piece_end - self.pos)
            self.pos = piece_end
            if len(self.done) < len(cuts) and self.pos == cuts[len(self.done)]:
                self._close_upload_part()

    def _close_upload_part(self) -> None:
        assert self.layout is not None
        k, crc = len(self.done), self.crc
        self.done.append(self.total)
        want = self.layout.parts[k]
        if want is not None and want != self.total and self.bad is None:
            start = self.layout.cuts[k - 1] if k else 0
            where = f"{crc.name} of upload part {k + 1} (bytes {start}-{self.pos})"
            self.bad = (where, crc.hex(self.total), crc.hex(want))
        self.total = 0

    def _composite(self) -> int:
        width = self.crc.bits // 8
        return self.crc.update(b"".join(v.to_bytes(width, "big") for v in self.done), 0)

    def failure(self) -> tuple[str, str, str] | None:
        """``(check, computed, published)`` when the joined file fails, else None."""
        crc = self.crc
        if self.layout is None:
            got, want = crc.hex(self.total), crc.hex(self.published)
            return None if got == want else (crc.name, got, want)
        if self.bad is not None:
            return self.bad
        got = f"{crc.hex(self._composite())}-{len(self.done)}"
        want = f"{crc.hex(self.published)}-{len(self.layout.sizes)}"
        return None if got == want else (f"composite {crc.name}", got, want)

    def recorded(self) -> str:
        """``<algorithm>:<hex>`` (``-N`` for a composite) for the manifest."""
        if self.layout is None:
            return f"{self.crc.name}:{self.crc.hex(self.total)}"
        return f"{self.crc.name}:{self.crc.hex(self._composite())}-{len(self.done)}"


def composite_from_base64(name: str, value: str) -> tuple[int, int] | None:
    """``(crc, parts)`` of a published composite checksum ``<b64>-N``; None if it is not
    one of a CRC we know."""
    head, dash, count = value.rpartition("-")
    if not dash or not count.isdecimal() or int(count) < 1:
        return None
    found = crc_from_base64(name, head)
    return (found[1], int(count)) if found is not None else None


def stream_from_base64(name: str, value: str) -> tuple[str, str] | None:
    """``(name, hex)`` of a published whole-object hash of :data:`STREAMS`; None if
    ``value`` is not one (a composite ``...-N``, a wrong width)."""
    make = STREAMS.get(name)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if make is None or len(raw) != make().digest_size:
        return None
    return name, raw.hex()


class Published(Protocol):
    """What a listed file publishes about its bytes (:class:`~.sources.base.RemoteFile`)."""

    size: int | None
    crc: tuple[str, int] | None
    composite: CompositeCrc | None
    digest: tuple[str, str] | None
    md5: str | None
    sha256: str | None
    git_sha1: str | None


def checks_applied(remote: Published, verify_md5: bool = True) -> list[str]:
    """The published checks the fetcher compares ``remote``'s bytes with, in one place for
    the fetcher and for status, cheapest first: a whole-object CRC, a composite CRC
    (``composite crc32c``), a hash folded in file order (``xxhash3``), each alone; else its
    MD5, sha256 and git blob sha1 as published; none (``[]``) means size only."""
    if remote.crc and remote.crc[0] in CRCS and remote.size is not None:
        return [remote.crc[0]]
    layout = remote.composite
    if layout and layout.name in CRCS and sum(layout.sizes) == remote.size:
        return [f"composite {layout.name}"]
    if remote.digest and remote.digest[0] in STREAMS:
        return [remote.digest[0]]
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
