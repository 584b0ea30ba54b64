"""Streamed tar archives (image and ModelPack layers) read within bounds.

tarfile reads the extended headers before an entry (pax ``x``/``g``, GNU long names
``L``/``K``) whole into memory, chained ones recursively, and a GNU sparse map block by
block without end; it decompresses whatever it is given. A layer blob of a few MiB could
so take GiBs of the agent's memory, or minutes of its CPU, before anything it writes is
counted. Here the extended headers before one entry may hold :data:`MAX_EXTENDED` together
(refused from their tar header, before tarfile reads them), and as much for a layer's
global headers; pax records are parsed in one pass (CVE-2024-6232); sparse entries are
refused; and every byte the stream yields after decompression goes through the caller's
``count``, which raises to stop it.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO

from nodecache.cache.quota import format_bytes

__all__ = ["ARCHIVE_ERRORS", "MAX_EXTENDED", "UnsafeArchive", "open_tar"]

MAX_EXTENDED = 1 << 20
"""Bytes of extended tar headers (pax, GNU long names) read before one entry, together."""
_MAX_EXTENDED_HEADERS = 8
"""Extended headers in a row (tarfile reads a chain of them recursively)."""
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_SPARSE = "has a GNU sparse entry, which we do not unpack"
_RECORD_LENGTH = re.compile(rb"([0-9]{1,20}) ")
ARCHIVE_ERRORS = (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError)
"""What a malformed archive raises while read (disk errors are OSError, not listed)."""


class UnsafeArchive(Exception):
    """An archive that would spend unbounded memory or CPU to read (said in ``args[0]``,
    as a predicate: "has ...")."""


@contextmanager
def open_tar(
    path: Path, *, gzipped: bool, count: Callable[[int], None], bufsize: int
) -> Iterator[tarfile.TarFile]:
    """The tar stream of file ``path`` (gzip-compressed where told), read within bounds.

    ``count`` gets the size of every chunk read after decompression, skipped entries
    included, and raises (:class:`UnsafeArchive`) to stop.
    """
    with (
        open(path, "rb") as blob,
        gzip.GzipFile(fileobj=blob) if gzipped else nullcontext(blob) as stream,
        _BoundedTar.open(
            fileobj=_Counted(stream, count), mode="r|", tarinfo=_BoundedInfo, bufsize=bufsize
        ) as tar,
    ):
        yield tar


class _BoundedTar(tarfile.TarFile):
    """A streamed tar that notes the extended headers it reads (see :class:`_BoundedInfo`)."""

    extended_bytes = 0
    extended_headers = 0
    global_bytes = 0

    def next(self) -> tarfile.TarInfo | None:
        self.extended_bytes = self.extended_headers = 0  # per entry; global ones add up
        return super().next()


class _BoundedInfo(tarfile.TarInfo):
    """Refuses an extended header from its tar header, before tarfile reads it into memory,
    where it would take one entry's headers (or the archive's global ones) past
    :data:`MAX_EXTENDED`; refuses sparse entries."""

    def _proc_member(self, tar: _BoundedTar) -> tarfile.TarInfo:
        if self.type in _EXTENDED:
            size = tarfile.BLOCKSIZE + self._block(self.size)
            tar.extended_bytes += size
            tar.extended_headers += 1
            if self.type == tarfile.XGLTYPE:
                tar.global_bytes += size
            if tar.extended_bytes > MAX_EXTENDED:
                raise UnsafeArchive(
                    f"has an extended tar header of {format_bytes(self.size)}, taking the "
                    f"headers of one entry past {format_bytes(MAX_EXTENDED)}"
                )
            if tar.global_bytes > MAX_EXTENDED:
                raise UnsafeArchive(f"has global pax headers past {format_bytes(MAX_EXTENDED)}")
            if tar.extended_headers > _MAX_EXTENDED_HEADERS:
                raise UnsafeArchive(
                    f"has more than {_MAX_EXTENDED_HEADERS} extended headers in a row"
                )
        elif self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive(_SPARSE)
        return super()._proc_member(tar)

    def _proc_pax(self, tar: _BoundedTar) -> tarfile.TarInfo:
        """tarfile's own, its records parsed in one pass: before Python 3.11.10 (Debian's
        3.11.2 too, unless patched) its regular expressions take time quadratic in a
        header's digits (CVE-2024-6232), half an hour for 1 MiB. Sparse maps are refused."""
        buf = tar.fileobj.read(self._block(self.size))
        headers = tar.pax_headers if self.type == tarfile.XGLTYPE else tar.pax_headers.copy()
        records, charset, pos = [], None, 0
        while pos < len(buf) and buf[pos] != 0:  # records: b"%d %s=%s\n" % (length, key, value)
            match = _RECORD_LENGTH.match(buf, pos)
            length = int(match.group(1)) if match else 0
            end = pos + length - 1  # the record's newline
            if match is None or length < 5 or end >= len(buf) or buf[end] != 0x0A:
                raise tarfile.ReadError("invalid pax header")
            key, equals, value = buf[match.end() : end].partition(b"=")
            if not key or not equals:
                raise tarfile.ReadError("invalid pax header")
            records.append((key, value))
            if key == b"hdrcharset" and charset is None:
                charset = tar.encoding if value == b"BINARY" else "utf-8"
            pos += length
        for raw_key, raw_value in records:
            key = self._decode_pax_field(raw_key, "utf-8", "utf-8", tar.errors)
            if key in tarfile.PAX_NAME_FIELDS:
                headers[key] = self._decode_pax_field(
                    raw_value, charset or "utf-8", tar.encoding, tar.errors
                )
            else:
                headers[key] = self._decode_pax_field(raw_value, "utf-8", "utf-8", tar.errors)
        if any(key.startswith("GNU.sparse.") for key in headers):
            raise UnsafeArchive(_SPARSE)
        try:
            entry = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            entry._apply_pax_info(headers, tar.encoding, tar.errors)
            entry.offset = self.offset
            if "size" in headers:  # the next header is after the size the pax header gave
                tar.offset = entry.offset_data
                if entry.isreg() or entry.type not in tarfile.SUPPORTED_TYPES:
                    tar.offset += entry._block(entry.size)
        return entry


class _Counted:
    """A stream whose every chunk read goes through ``count`` first."""

    def __init__(self, stream: IO[bytes], count: Callable[[int], None]) -> None:
        self.stream = stream
        self.count = count

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count(len(data))
        return data
