"""Prometheus metrics of the disk tier, read from a :class:`.ModelStore`.

A collector, not counters updated in the byte path: the store already keeps its numbers in
:class:`~nodecache.cache.stats.StoreStats` (updated from worker threads for every chunk), and
reading them at scrape time costs nothing while fetching. ``register_store_metrics(store)`` once per
process, usually right after the store is made; scrape the registry as usual.

Exported (all prefixed ``nodecache_cache_``):

=================================  =========  =============================================
``fetched_bytes_total``            counter    bytes downloaded from sources (resumed bytes
                                              already on disk are not counted again)
``fetch_duration_seconds``         histogram  wall time of each completed download
``fetch_failures_total``           counter    downloads that ended in an error
``retries_total``                  counter    transient errors retried (parts and listings)
``hits_total`` / ``misses_total``  counter    fetches answered from disk / that downloaded
``evictions_total``                counter    models deleted to make room
``used_bytes``                     gauge      published models plus partial downloads
``limit_bytes``                    gauge      the store's quota; the filesystem's size when
                                              the store has none
``disk_free_bytes``                gauge      free space on the cache's filesystem
``models``                         gauge      published models on disk
=================================  =========  =============================================
"""

from __future__ import annotations

import bisect
import logging
import shutil
import threading
from collections.abc import Iterable, Sequence

from prometheus_client.core import (
    REGISTRY,
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nodecache.cache.store import ModelStore

__all__ = [
    "FETCH_DURATION_BUCKETS",
    "StoreCollector",
    "register_store_metrics",
    "unregister_store_metrics",
]

log = logging.getLogger(__name__)

PREFIX = "nodecache_cache_"
FETCH_DURATION_BUCKETS: tuple[float, ...] = (
    0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
)  # fmt: skip
"""Seconds; models take from well under a second (tiny, hit the page cache) to an hour."""

_registered: dict[int, tuple[CollectorRegistry, StoreCollector]] = {}
_registered_lock = threading.RLock()


class StoreCollector(Collector):
    """Turns one store's counters into Prometheus metrics at scrape time.

    The duration histogram is accumulated here: the store keeps only its last 1000
    durations, so each scrape folds in the ones completed since the previous scrape
    (``StoreStats.fetches`` says how many), and the buckets stay monotonic for ever.
    """

    def __init__(
        self, store: ModelStore, buckets: Sequence[float] = FETCH_DURATION_BUCKETS
    ) -> None:
        self.store = store
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._counts = [0] * (len(self.bounds) + 1)  # last: above every bound
        self._sum = 0.0
        self._seen = 0
        self._used = 0
        self._models = 0
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Names only: the registry checks for duplicates without a scrape touching the disk.
        return self._families(used=0, limit=0, free=0, models=0)

    def collect(self) -> Iterable[Metric]:
        store = self.store
        with self._lock:
            self._fold_durations()
            try:
                self._used = store.used_bytes()
                self._models = len(store.models())
            except (OSError, RuntimeError):  # a model vanished while we counted
                log.debug("could not measure the store; reporting the last value", exc_info=True)
            try:
                disk = shutil.disk_usage(store.root)
                total, free = disk.total, disk.free
            except OSError:
                total = free = 0
            limit = store.limit_bytes if store.limit_bytes is not None else total
            return self._families(used=self._used, limit=limit, free=free, models=self._models)

    def _fold_durations(self) -> None:
        stats = self.store.stats
        completed, recent = stats.fetches, list(stats.fetch_seconds)
        new = completed - self._seen
        if new <= 0:
            return
        for seconds in recent[-new:] if new <= len(recent) else recent:
            self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds
        self._seen = completed

    def _families(self, *, used: int, limit: int, free: int, models: int) -> list[Metric]:
        stats = self.store.stats
        cumulative, running = [], 0
        for bound, count in zip(self.bounds, self._counts, strict=False):
            running += count
            cumulative.append((_bound(bound), running))
        cumulative.append(("+Inf", running + self._counts[-1]))

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        return [
            counter("fetched_bytes", "Bytes downloaded from model sources.", stats.bytes_fetched),
            HistogramMetricFamily(
                PREFIX + "fetch_duration_seconds",
                "Wall time of each completed model download, listing to publish.",
                buckets=cumulative,
                sum_value=self._sum,
            ),
            counter(
                "fetch_failures", "Model downloads that ended in an error.", stats.fetches_failed
            ),
            counter("retries", "Transient source errors that were retried.", stats.retries),
            counter("hits", "Fetches answered by a model already on disk.", stats.hits),
            counter("misses", "Fetches that had to download the model.", stats.misses),
            counter("evictions", "Models deleted to make room for others.", stats.evictions),
            gauge("used_bytes", "Bytes held: published models plus partial downloads.", used),
            gauge(
                "limit_bytes",
                "Size limit of the store (the filesystem size if it has none).",
                limit,
            ),
            gauge("disk_free_bytes", "Free bytes on the cache's filesystem.", free),
            gauge("models", "Published models on disk.", models),
        ]


def _bound(value: float) -> str:
    return str(int(value)) + ".0" if value == int(value) else repr(value)


def register_store_metrics(
    store: ModelStore, registry: CollectorRegistry = REGISTRY
) -> StoreCollector:
    """Export ``store``'s metrics from ``registry`` (the default one unless told).

    One store per registry: registering another replaces the previous one, so an agent
    that re-creates its store (or a test suite making many) never hits duplicate names.
    """
    collector = StoreCollector(store)
    with _registered_lock:
        unregister_store_metrics(registry)
        registry.register(collector)
        _registered[id(registry)] = (registry, collector)
    return collector


def unregister_store_metrics(registry: CollectorRegistry = REGISTRY) -> None:
    """Stop exporting the store registered on ``registry``, if any."""
    with _registered_lock:
        previous = _registered.pop(id(registry), None)
        if previous is not None:
            previous[0].unregister(previous[1])
