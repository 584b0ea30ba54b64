"""Quota: refusal before download, LRU eviction, models in use or protected never evicted."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from nodecache.cache import (
    DERIVED_DIR,
    FetchOptions,
    InsufficientSpaceError,
    ModelInUseError,
    ModelStore,
    format_bytes,
)

OPTS = FetchOptions(chunk_size=64 * 1024, part_size=64 * 1024, fsync=False)


def source(tmp_path: Path, name: str, size: int) -> str:
    folder = tmp_path / "sources" / name
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(size))
    return f"file://{folder}"


def keys(store: ModelStore) -> set[str]:
    return {m.source_uri.rsplit("/", 1)[-1] for m in store.models()}


async def test_least_recently_used_model_is_evicted_to_make_room(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", options=OPTS, limit_bytes=1000)
    a, b, c, d = (source(tmp_path, n, 300) for n in "abcd")
    for uri in (a, b, c):
        await store.fetch(uri)
    model_a = store.lookup(a)
    model_b = store.lookup(b)
    assert model_a is not None and model_b is not None
    # b is used after c was fetched, so a is now the least recently used.
    with store.use(b):
        pass

    await store.fetch(d)

    assert keys(store) == {"b", "c", "d"}
    assert not model_a.path.exists()
    assert store.used_bytes() == 900
    assert store.stats.evictions == 1


async def test_model_that_cannot_fit_is_refused_before_downloading(
    tmp_path: Path, counting_http: tuple[str, dict[str, int]]
) -> None:
    base, gets = counting_http
    store = ModelStore(tmp_path / "cache", options=OPTS, limit_bytes=1000)

    with pytest.raises(InsufficientSpaceError) as info:
        await store.fetch(f"{base}/big.bin")

    message = str(info.value)
    assert f"needs {format_bytes(5000)}, limit {format_bytes(1000)}, free" in message
    assert gets.get("/big.bin", 0) == 0  # nothing was downloaded
    assert store.models() == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_models_in_use_or_protected_are_never_evicted(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", options=OPTS, limit_bytes=1000)
    a, b, c, d = (source(tmp_path, n, 400) for n in "abcd")
    await store.fetch(a)
    await store.fetch(b)
    store.protect([b])

    with store.use(a) as held:
        with pytest.raises(InsufficientSpaceError, match="needs"):
            await store.fetch(c)
        assert held.path.exists()
        assert (held.path / "weights.bin").stat().st_size == 400
        with pytest.raises(ModelInUseError):
            store.remove(a)

    # Released: a may go now, b stays protected.
    await store.fetch(c)
    assert keys(store) == {"b", "c"}
    store.protect([])
    await store.fetch(d)
    assert len(keys(store)) == 2
    assert "d" in keys(store)


async def test_model_larger_than_the_limit_names_sizes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", options=OPTS, limit_bytes=2048)
    await store.fetch(source(tmp_path, "small", 1024))
    with pytest.raises(InsufficientSpaceError) as info:
        await store.fetch(source(tmp_path, "huge", 3 * 1024))
    assert str(info.value).endswith(
        f"needs 3.0 KiB, limit 2.0 KiB, free 1.0 KiB (+{format_bytes(1024)} evictable)"
    )
    assert info.value.needed == 3 * 1024
    assert keys(store) == {"small"}  # nothing evicted for a model that cannot fit anyway


@pytest.fixture
async def counting_http() -> AsyncIterator[tuple[str, dict[str, int]]]:
    gets: dict[str, int] = {}
    body = os.urandom(5000)

    async def big(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            gets[request.path] = gets.get(request.path, 0) + 1
        return web.Response(body=body, headers={"Accept-Ranges": "bytes"})

    app = web.Application()
    app.router.add_route("*", "/big.bin", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", gets
    await runner.cleanup()


async def test_files_a_runtime_derives_count_against_the_limit(tmp_path: Path) -> None:
    """A runtime's faster-loading copy (serve/runtimes/onnx.py) lives in the model folder:
    it is counted, makes its model cost more to keep, and goes when the model is evicted."""
    store = ModelStore(tmp_path / "cache", options=OPTS, limit_bytes=1000)
    a, b = source(tmp_path, "a", 300), source(tmp_path, "b", 300)
    model_a = await store.fetch(a)
    derived = model_a.path / DERIVED_DIR / "copy"
    derived.mkdir(parents=True)
    (derived / "weights.bin").write_bytes(os.urandom(250))
    assert store.used_bytes() == 550

    await store.fetch(b)  # 850 of 1000: no eviction yet
    assert keys(store) == {"a", "b"}
    await store.fetch(source(tmp_path, "c", 300))  # needs 150 more: a (550 held) goes
    assert keys(store) == {"b", "c"}
    assert not model_a.path.exists()
    assert store.used_bytes() == 600


# ---- the pure policy ------------------------------------------------------------------------


def test_plan_room_takes_nothing_when_it_fits() -> None:
    from nodecache.cache.quota import Held, RoomPlan, plan_room

    assert plan_room(100, 100, {"p": 50}, [Held("m", 10)]) == RoomPlan(())


def test_plan_room_takes_idle_partials_by_key_then_models_in_the_order_given() -> None:
    from nodecache.cache.quota import Held, RoomPlan, plan_room

    models = [Held("old", 30), Held("newer", 30), Held("newest", 30)]
    plan = plan_room(80, 10, {"b": 20, "a": 20}, models)

    assert plan == RoomPlan(
        (Held("a", 20, partial=True), Held("b", 20, partial=True), Held("old", 30))
    )


def test_plan_room_refuses_with_what_could_have_gone() -> None:
    from nodecache.cache.quota import Held, Refusal, plan_room

    assert plan_room(100, 10, {"p": 20}, [Held("m", 30)]) == Refusal(100, 10, 50)
    assert plan_room(100, -5, {}, []) == Refusal(100, -5, 0)
