"""Disk-tier Prometheus metrics, read from a store that fetched from a real HTTP server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodecache.cache import FetchError, FetchOptions, ModelStore
from nodecache.cache.metrics import StoreCollector, register_store_metrics, unregister_store_metrics

SMALL = FetchOptions(
    chunk_size=64 * 1024,
    part_size=256 * 1024,
    fsync=False,
    retries=3,
    backoff_base=0.01,
    backoff_max=0.05,
)


@dataclass
class Http:
    base: str
    docroot: Path


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[Http]:
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    flaky_calls = {"n": 0}

    async def flaky(request: web.Request) -> web.StreamResponse:
        # The first GET is throttled (503, retried); then the bytes come.
        if request.method == "GET":
            flaky_calls["n"] += 1
            if flaky_calls["n"] == 1:
                raise web.HTTPServiceUnavailable(text="slow down")
        return web.Response(body=b"f" * 10_000)

    app = web.Application()
    app.router.add_route("*", "/fault/flaky.bin", flaky)
    app.router.add_static("/models/", docroot, show_index=True)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield Http(f"http://{host}:{port}", docroot)
    await runner.cleanup()


@pytest.fixture
def default_registry() -> Iterator[CollectorRegistry]:
    yield REGISTRY
    unregister_store_metrics(REGISTRY)


def scrape(registry: CollectorRegistry = REGISTRY) -> dict[str, float]:
    """Every ``nodecache_cache_*`` sample by name (with ``le`` for histogram buckets)."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("nodecache_cache_"):
                le = sample.labels.get("le")
                out[f"{sample.name}{{le={le}}}" if le else sample.name] = sample.value
    return out


def write(folder: Path, files: dict[str, int]) -> int:
    for rel, size in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(os.urandom(size))
    return sum(files.values())


async def test_fetch_from_http_shows_in_generate_latest(
    tmp_path: Path, http: Http, default_registry: CollectorRegistry
) -> None:
    size = write(http.docroot / "m", {"model.onnx": 700_001, "config.json": 123})
    store = ModelStore(tmp_path / "cache", options=SMALL, limit_bytes=10_000_000)
    register_store_metrics(store)

    before = scrape()
    assert before["nodecache_cache_fetched_bytes_total"] == 0
    assert before["nodecache_cache_fetch_duration_seconds_count"] == 0
    assert before["nodecache_cache_used_bytes"] == 0

    await store.fetch(f"{http.base}/models/m/")
    after = scrape()

    assert after["nodecache_cache_fetched_bytes_total"] == size
    assert after["nodecache_cache_misses_total"] == 1
    assert after["nodecache_cache_hits_total"] == 0
    assert after["nodecache_cache_fetch_duration_seconds_count"] == 1
    assert after["nodecache_cache_fetch_duration_seconds_sum"] > 0
    assert after["nodecache_cache_fetch_duration_seconds_bucket{le=+Inf}"] == 1
    assert after["nodecache_cache_used_bytes"] == size
    assert after["nodecache_cache_limit_bytes"] == 10_000_000
    assert after["nodecache_cache_disk_free_bytes"] > 0
    assert after["nodecache_cache_models"] == 1

    await store.fetch(f"{http.base}/models/m/")  # from disk this time
    hit = scrape()

    assert hit["nodecache_cache_hits_total"] == 1
    assert hit["nodecache_cache_fetched_bytes_total"] == size
    assert hit["nodecache_cache_fetch_duration_seconds_count"] == 1


async def test_retries_failures_and_evictions_are_counted(
    tmp_path: Path, http: Http, default_registry: CollectorRegistry
) -> None:
    write(http.docroot / "a", {"w.bin": 600_000})
    write(http.docroot / "b", {"w.bin": 600_000})
    store = ModelStore(tmp_path / "cache", options=SMALL, limit_bytes=1_000_000)
    register_store_metrics(store)

    await store.fetch(f"{http.base}/fault/flaky.bin")
    with pytest.raises(FetchError):
        await store.fetch(f"{http.base}/models/missing.bin")
    store.remove(f"{http.base}/fault/flaky.bin")
    await store.fetch(f"{http.base}/models/a/")
    await store.fetch(f"{http.base}/models/b/")  # only fits once a/ is evicted
    metrics = scrape()

    assert metrics["nodecache_cache_retries_total"] >= 1
    assert metrics["nodecache_cache_fetch_failures_total"] == 1
    assert metrics["nodecache_cache_evictions_total"] == 1
    assert metrics["nodecache_cache_models"] == 1
    assert metrics["nodecache_cache_used_bytes"] == 600_000
    assert metrics["nodecache_cache_fetch_duration_seconds_count"] == 3


def test_registering_another_store_replaces_the_first(
    tmp_path: Path, default_registry: CollectorRegistry
) -> None:
    register_store_metrics(ModelStore(tmp_path / "one", limit_bytes=1000))
    register_store_metrics(ModelStore(tmp_path / "two", limit_bytes=2000))  # no duplicate error

    assert scrape()["nodecache_cache_limit_bytes"] == 2000


def test_histogram_counts_every_fetch_though_the_store_keeps_only_1000(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache")
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, buckets=(1.0, 10.0)))

    def completed(durations: list[float]) -> None:
        for seconds in durations:  # what the store does after each published download
            store.stats.fetch_seconds = [*store.stats.fetch_seconds[-999:], seconds]
            store.stats.fetches += 1

    completed([0.5] * 600)
    first = scrape(registry)
    completed([5.0] * 900)  # the store's list now holds 100 x 0.5 and 900 x 5.0
    second = scrape(registry)

    assert first["nodecache_cache_fetch_duration_seconds_bucket{le=1.0}"] == 600
    assert second["nodecache_cache_fetch_duration_seconds_bucket{le=1.0}"] == 600
    assert second["nodecache_cache_fetch_duration_seconds_bucket{le=10.0}"] == 1500
    assert second["nodecache_cache_fetch_duration_seconds_count"] == 1500
    assert second["nodecache_cache_fetch_duration_seconds_sum"] == pytest.approx(600 * 0.5 + 4500)
