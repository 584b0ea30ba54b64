"""The store's counters, kept apart from the store so a metrics exporter reads plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["StoreStats"]


@dataclass
class StoreStats:
    """Counters for metrics; read them, never write them."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    evictions: int = 0
    fetches_failed: int = 0
    fetches: int = 0
    """Downloads completed and published (``fetch_seconds`` keeps only the last 1000, so
    a metrics exporter needs this count to tell which durations are new)."""
    fetch_seconds: list[float] = field(default_factory=list)
    """Durations of completed downloads (the last 1000)."""
