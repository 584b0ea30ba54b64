"""How the store reads from sources: one frozen record shared by the engine, the retry loop
and the download orchestration, so none of them imports another for its settings."""

from __future__ import annotations

from dataclasses import dataclass

from nodecache.cache.ociref import Mirror

__all__ = ["FetchOptions", "MiB"]

MiB = 1 << 20


@dataclass(frozen=True)
class FetchOptions:
    """How the store reads from sources. The defaults suit NVMe and a fast object store."""

    concurrency: int = 8
    """Ranged parts (of one or many files) read at the same time."""
    part_size: int = 32 * MiB
    """Objects larger than this are split into ranged parts of this size."""
    chunk_size: int = 256 * 1024
    """Bytes per read and per write; memory is about concurrency x chunk_size. Small enough
    that a chunk is still in the CPU cache when it is hashed and copied into the page cache:
    4 MiB chunks cost ~1 CPU-second more per GiB here (the pwrite copy reads DRAM)."""
    timeout: float = 60.0
    """Seconds to connect, or without a byte from the source, before a read counts as
    stalled (and is retried)."""
    retries: int = 6
    """Attempts after the first for a transient error of one part or listing."""
    backoff_base: float = 0.25
    """First retry waits about this long (seconds); each further one doubles it."""
    backoff_max: float = 20.0
    """Longest wait between two attempts (seconds)."""
    fsync: bool = True
    """Flush bytes to stable storage before recording parts and before publishing, so a
    power loss never leaves a published model (or a resumable part) with missing bytes."""
    journal_interval: float = 1.0
    """Seconds between journal writes; a kill loses at most this much progress."""
    verify_md5: bool = True
    """Check the MD5 the source publishes (costs ~1.4 CPU-seconds per GiB)."""
    registry_mirrors: tuple[Mirror, ...] = ()
    """``oci://`` registries' mirrors (``--registry-mirror``), tried first in this order."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.chunk_size < 4096:
            raise ValueError("chunk_size must be at least 4 KiB")
        if self.part_size < self.chunk_size:
            raise ValueError("part_size must be at least chunk_size")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
