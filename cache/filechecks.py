"""What one file is checked by while it is fetched, as the fetcher folds its bytes in.

Either the source's CRC (one per part, joined in file order, whole-object or composite:
:class:`CrcFold`), or a hash folded in file order: the one the source publishes (S3
XXHASH3/64/128, SHA1) or else a sha256, plus the MD5 and git blob sha1 the source publishes
(:func:`~nodecache.cache.checksums.checks_applied` decides); and, whatever the check, the
xxh3-128 of each part, the file's local digest (:mod:`nodecache.cache.localdigest`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from nodecache.cache.checksums import CRCS, STREAMS, CrcFold, Published, checks_applied
from nodecache.cache.localdigest import LocalDigest, new_hash

__all__ = ["FileChecks"]


@dataclass
class FileChecks:
    """The running checks of one file. Not thread-safe: the fetcher feeds the hashes from
    one thread at a time, in file order, and records each part's local digest under its
    own lock."""

    ordered: Any = None
    """The hash fed in file order (:attr:`ordered_name`); None when the file is verified
    by the source's CRC (:attr:`crc`)."""
    ordered_name: str = "sha256"
    crc: CrcFold | None = None
    md5: Any = None
    git_sha1: Any = None
    """Git blob sha1 (header already fed), where the source publishes one."""
    local: dict[int, str] = field(default_factory=dict)
    """The xxh3-128 of each part, by part index."""

    @classmethod
    def plan(cls, remote: Published, *, verify_md5: bool) -> FileChecks:
        names = checks_applied(remote, verify_md5)
        first = names[0] if names else ""
        # A CRC or a published hash is the check: no sha256, MD5 or sha1 of every byte.
        if first in CRCS and remote.crc is not None:
            return cls(crc=CrcFold(CRCS[first], remote.crc[1]))
        if first.startswith("composite ") and remote.composite is not None:
            layout = remote.composite
            return cls(crc=CrcFold(CRCS[layout.name], layout.value, layout))
        if first in STREAMS:
            return cls(ordered=STREAMS[first](), ordered_name=first)
        checks = cls(ordered=hashlib.sha256())
        if "MD5" in names:
            checks.md5 = hashlib.md5(usedforsecurity=False)
        if "git blob sha1" in names:
            checks.git_sha1 = hashlib.sha1(b"blob %d\0" % (remote.size or 0), usedforsecurity=False)
        return checks

    def feed(self, chunk: memoryview) -> None:
        """The next bytes of the file, in order, into the hashes folded in file order."""
        self.ordered.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)
        if self.git_sha1 is not None:
            self.git_sha1.update(chunk)

    def failure(self, remote: Published) -> tuple[str, str, str] | None:
        """``(check, computed, published)`` of the first check the whole file fails."""
        if self.crc is not None:
            return self.crc.failure()
        published = remote.digest[1] if remote.digest else None
        if self.ordered_name == "sha256":
            published = remote.sha256
        checks = [
            ("MD5", self.md5 and self.md5.hexdigest(), remote.md5),
            (self.ordered_name, self.ordered.hexdigest(), published),
            ("git blob sha1", self.git_sha1 and self.git_sha1.hexdigest(), remote.git_sha1),
        ]
        for name, got, published in checks:
            if got and published and got != published.lower():
                return name, got, published
        return None

    def recorded(self) -> tuple[str | None, str | None]:
        """``(sha256, checksum)`` for the manifest: the sha256 computed, or the source's
        checksum (``<algorithm>:<hex>``) the file was verified by."""
        if self.crc is not None:
            return None, self.crc.recorded()
        if self.ordered_name != "sha256":
            return None, f"{self.ordered_name}:{self.ordered.hexdigest()}"
        return self.ordered.hexdigest(), None

    def local_digest(self, parts: int, part_size: int) -> LocalDigest:
        """The local digest of a file of ``parts`` parts (none: an empty file)."""
        digests = [self.local[i] for i in range(parts)] or [new_hash().hexdigest()]
        return LocalDigest(part_size if parts > 1 else 0, tuple(digests))
