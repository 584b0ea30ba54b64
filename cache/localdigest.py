"""The fast local digest of a file on disk: one xxh3-128 per fixed-size chunk.

Recorded when the fetcher verifies a file by the source's own check, so ``nodecache
verify`` and the agent's start-up check can re-verify the disk at memory bandwidth without
the source. Parts arrive in parallel and out of order: the chunks are the fetcher's parts
(``part_size``), so each part folds its own digest as its bytes arrive, and chunks can be
re-hashed in parallel. xxhash releases the GIL while it hashes a buffer (checked: another
thread keeps running during a 512 MiB hash), so threads hash chunks in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = ["ALGORITHM", "LocalDigest", "chunk_ranges", "new_hash"]

ALGORITHM = "xxh3-128"


def new_hash() -> Any:
    """An empty xxh3-128 (``update``, ``hexdigest``)."""
    return xxhash.xxh3_128()


def chunk_ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each chunk of a ``size``-byte file; ``chunk`` 0 (a file
    written whole) or one at least ``size`` is one chunk, and an empty file one empty chunk."""
    if size <= 0 or chunk <= 0 or chunk >= size:
        return [(0, max(size, 0))]
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


@dataclass(frozen=True)
class LocalDigest:
    """A file's chunk digests: chunk ``i`` is ``[i*chunk, (i+1)*chunk)`` (the last may be
    shorter); ``chunk`` 0 means one chunk, the whole file."""

    chunk: int
    digests: tuple[str, ...]

    def ranges(self, size: int) -> list[tuple[int, int]]:
        return chunk_ranges(size, self.chunk)

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": ALGORITHM, "chunk": self.chunk, "digests": list(self.digests)}

    @classmethod
    def from_json(cls, raw: Any, size: int) -> LocalDigest | None:
        """The digest a manifest recorded; None when it recorded none (a manifest older
        than local digests) or one this version does not know, or that does not fit
        ``size``."""
        if not isinstance(raw, dict) or raw.get("algorithm") != ALGORITHM:
            return None
        chunk, digests = raw.get("chunk"), raw.get("digests")
        if not isinstance(chunk, int) or chunk < 0 or not isinstance(digests, list):
            return None
        if not all(isinstance(d, str) and len(d) == 32 for d in digests):
            return None
        if len(digests) != len(chunk_ranges(size, chunk)):
            return None
        return cls(chunk, tuple(digests))
