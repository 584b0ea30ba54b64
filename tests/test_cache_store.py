"""The model store against real sources: local folders and an HTTP server on loopback."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from support import SMALL

from nodecache.cache import (
    MANIFEST_NAME,
    CacheError,
    FetchError,
    FetchOptions,
    IntegrityError,
    InvalidSourceError,
    ModelStore,
)


def make_model(root: Path) -> dict[str, bytes]:
    """A small model folder: a few files of odd sizes, one nested, one empty."""
    files = {
        "config.json": b'{"name": "tiny"}\n',
        "weights/part-0.bin": os.urandom(300_001),
        "weights/part-1.bin": os.urandom(70_000),
        "empty.txt": b"",
        "tokenizer/vocab with space.txt": b"a\nb\nc\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_model(folder: Path) -> dict[str, bytes]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.name != MANIFEST_NAME:
            out[path.relative_to(folder).as_posix()] = path.read_bytes()
    return out


def tmp_entries(store_root: Path) -> list[str]:
    return sorted(p.name for p in (store_root / "tmp").iterdir())


def published(store_root: Path) -> list[str]:
    return sorted(p.name for p in (store_root / "models").iterdir())


@dataclass
class HttpServer:
    """An aiohttp server on 127.0.0.1 serving a folder with index pages, plus fault routes."""

    base: str
    docroot: Path
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    def gets(self, suffix: str) -> int:
        return sum(n for path, n in self.requests.items() if path.endswith(suffix))

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[HttpServer]:
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    server = HttpServer(base="", docroot=docroot)

    @web.middleware
    async def count(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.method == "GET":
            server.requests[request.path] += 1
        return await handler(request)

    async def liar(request: web.Request) -> web.StreamResponse:
        # Promises 1000 bytes, sends 600, then drops the connection.
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        if request.method == "GET":
            await resp.write(b"x" * 600)
            assert request.transport is not None
            request.transport.close()
        return resp

    async def shrinking(request: web.Request) -> web.StreamResponse:
        # HEAD says 1000 bytes; the GET honestly sends a 600-byte body.
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": "1000"})
        return web.Response(body=b"y" * 600)

    async def slow(request: web.Request) -> web.StreamResponse:
        # Sends half the body, then waits for the test to open the gate.
        resp = web.StreamResponse(headers={"Content-Length": "200000"})
        await resp.prepare(request)
        if request.method == "GET":
            await resp.write(b"z" * 100_000)
            await server.gate.wait()
            await resp.write(b"z" * 100_000)
        return resp

    async def forbidden(request: web.Request) -> web.StreamResponse:
        raise web.HTTPForbidden(text="no access for you")

    app = web.Application(middlewares=[count])
    app.router.add_route("*", "/fault/liar.bin", liar)
    app.router.add_route("*", "/fault/shrinking.bin", shrinking)
    app.router.add_route("*", "/fault/slow.bin", slow)
    app.router.add_route("*", "/fault/forbidden.bin", forbidden)
    app.router.add_static("/models/", docroot, show_index=True)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base = f"http://{host}:{port}"
    server.runner = runner
    yield server
    server.gate.set()
    await server.stop()


# ---- file:// -----------------------------------------------------------------------------


async def test_fetch_local_folder_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "src" / "tiny"
    files = make_model(src)
    store = ModelStore(tmp_path / "cache", options=SMALL)
    seen: list[tuple[int, int | None]] = []

    model = await store.fetch(f"file://{src}/", progress=lambda d, t: seen.append((d, t)))

    assert model.path == tmp_path / "cache" / "models" / model.key
    assert read_model(model.path) == files
    assert {f.path for f in model.files} == set(files)
    for f in model.files:
        assert f.sha256 == hashlib.sha256(files[f.path]).hexdigest()
        assert f.size == len(files[f.path])
    assert model.size_bytes == sum(len(b) for b in files.values())
    assert store.used_bytes() == model.size_bytes
    assert seen[-1] == (model.size_bytes, model.size_bytes)
    assert tmp_entries(tmp_path / "cache") == []
    manifest = json.loads((model.path / MANIFEST_NAME).read_text())
    assert manifest["source_uri"] == f"file://{src}"
    assert {f["path"] for f in manifest["files"]} == set(files)
    assert "fetched_at" in manifest


async def test_fetch_local_single_file_is_stored_under_its_name(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(os.urandom(123_457))
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"file://{src}")

    assert [f.path for f in model.files] == ["model.onnx"]
    assert (model.path / "model.onnx").read_bytes() == src.read_bytes()


async def test_cache_hit_returns_the_same_model_without_reading_the_source(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    make_model(src)
    store = ModelStore(tmp_path / "cache", options=SMALL)
    first = await store.fetch(f"file://{src}")
    (src / "config.json").write_bytes(b"changed")  # a hit must not notice

    again = await store.fetch(f"file://{src}/")

    assert again == first
    assert (first.hit, again.hit) == (False, True)  # fetch itself says whether it hit
    assert (again.path / "config.json").read_bytes() == b'{"name": "tiny"}\n'


async def test_missing_local_source_is_a_permanent_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"file://{tmp_path}/nope")
    assert info.value.permanent
    assert "does not exist" in str(info.value)
    assert published(tmp_path / "cache") == []
    assert tmp_entries(tmp_path / "cache") == []


async def test_symlink_leaving_the_source_folder_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_model(src)
    (tmp_path / "secret").write_text("do not copy")
    (src / "innocent.txt").symlink_to(tmp_path / "secret")
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError, match="points outside the folder") as info:
        await store.fetch(f"file://{src}")

    assert info.value.permanent
    assert published(tmp_path / "cache") == []


async def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError, match="no files"):
        await store.fetch(f"file://{tmp_path}/empty")


async def test_invalid_uri_is_refused_before_anything_happens(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(InvalidSourceError, match="unknown scheme 'ftp'"):
        await store.fetch("ftp://example.com/model")
    with pytest.raises(InvalidSourceError, match="missing path"):
        await store.fetch("s3://bucket")
    assert store.lookup("file:///does/not/exist") is None
    with pytest.raises(InvalidSourceError):
        store.lookup("nope")


# ---- http:// -----------------------------------------------------------------------------


async def test_fetch_http_folder_from_index_pages(tmp_path: Path, http: HttpServer) -> None:
    files = make_model(http.docroot / "tiny")
    store = ModelStore(tmp_path / "cache", options=SMALL)
    seen: list[tuple[int, int | None]] = []

    model = await store.fetch(
        f"{http.base}/models/tiny/", progress=lambda d, t: seen.append((d, t))
    )

    assert read_model(model.path) == files
    assert seen[-1] == (model.size_bytes, model.size_bytes)
    assert tmp_entries(tmp_path / "cache") == []


async def test_fetch_http_single_file(tmp_path: Path, http: HttpServer) -> None:
    data = os.urandom(1_000_003)
    (http.docroot / "model.onnx").write_bytes(data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"{http.base}/models/model.onnx")

    assert (model.path / "model.onnx").read_bytes() == data
    assert model.files[0].sha256 == hashlib.sha256(data).hexdigest()


async def test_http_404_is_permanent_and_publishes_nothing(
    tmp_path: Path, http: HttpServer
) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"{http.base}/models/missing.onnx")
    assert info.value.permanent
    assert "not found" in str(info.value)
    assert published(tmp_path / "cache") == []
    assert tmp_entries(tmp_path / "cache") == []


async def test_http_403_is_permanent(tmp_path: Path, http: HttpServer) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"{http.base}/fault/forbidden.bin")
    assert info.value.permanent
    assert "403" in str(info.value)


async def test_body_cut_short_is_a_transient_error_and_nothing_is_published(
    tmp_path: Path, http: HttpServer
) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"{http.base}/fault/liar.bin")
    assert not info.value.permanent
    assert "(transient)" in str(info.value)
    assert published(tmp_path / "cache") == []
    # What arrived stays as a resumable partial, never as a model.
    assert all(name.endswith(".partial") for name in tmp_entries(tmp_path / "cache"))
    assert store.lookup(f"{http.base}/fault/liar.bin") is None


async def test_size_different_from_what_the_source_says_is_an_integrity_error(
    tmp_path: Path, http: HttpServer
) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(IntegrityError, match="served 600 bytes where 1000 were announced"):
        await store.fetch(f"{http.base}/fault/shrinking.bin")
    assert published(tmp_path / "cache") == []
    assert tmp_entries(tmp_path / "cache") == []


async def test_concurrent_fetches_of_one_source_download_once(
    tmp_path: Path, http: HttpServer
) -> None:
    files = make_model(http.docroot / "tiny")
    store = ModelStore(tmp_path / "cache", options=SMALL)
    uri = f"{http.base}/models/tiny/"

    models = await asyncio.gather(*(store.fetch(uri) for _ in range(5)))

    assert all(m == models[0] for m in models)
    assert read_model(models[0].path) == files
    for rel, data in files.items():
        parts = -(-len(data) // SMALL.part_size)  # one ranged GET per part, none if empty
        assert http.gets(rel) == parts, rel


async def test_restart_finds_the_model_without_the_network(
    tmp_path: Path, http: HttpServer
) -> None:
    files = make_model(http.docroot / "tiny")
    uri = f"{http.base}/models/tiny/"
    first = await ModelStore(tmp_path / "cache", options=SMALL).fetch(uri)
    await http.stop()

    store = ModelStore(tmp_path / "cache", options=SMALL)
    assert [m.key for m in store.scan()] == [first.key]
    assert store.lookup(uri) == first
    again = await store.fetch(uri)
    assert again == first
    assert read_model(again.path) == files


async def test_cancelling_the_only_caller_stops_the_download(
    tmp_path: Path, http: HttpServer
) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    started = asyncio.Event()

    def progress(done: int, total: int | None) -> None:
        if done:
            loop.call_soon_threadsafe(started.set)

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(store.fetch(f"{http.base}/fault/slow.bin", progress=progress))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    http.gate.set()  # let the blocked read return so the worker notices
    assert published(tmp_path / "cache") == []
    # The part that arrived is kept for a later fetch to resume; then it completes.
    model = await store.fetch(f"{http.base}/fault/slow.bin")
    assert (model.path / "slow.bin").read_bytes() == b"z" * 200_000
    assert tmp_entries(tmp_path / "cache") == []


# ---- scan, remove -----------------------------------------------------------------------


async def test_scan_removes_partials_and_damaged_models(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = ModelStore(root, options=SMALL)
    good_src, bad_src = tmp_path / "good", tmp_path / "bad"
    make_model(good_src)
    make_model(bad_src)
    good = await store.fetch(f"file://{good_src}")
    bad = await store.fetch(f"file://{bad_src}")
    # A crash left a partial download, a model lost a byte, another lost its manifest.
    (root / "tmp" / f"{good.key}.dead").mkdir()
    (root / "tmp" / f"{good.key}.dead" / "x.bin").write_bytes(b"partial")
    with open(bad.path / "weights" / "part-0.bin", "r+b") as f:
        f.truncate(1000)
    no_manifest = root / "models" / "stray-0123456789abcdef"
    no_manifest.mkdir()
    (no_manifest / "w.bin").write_bytes(b"w")
    (root / "models" / "junk.txt").write_text("not a model")

    fresh = ModelStore(root, options=SMALL)
    intact = fresh.scan()

    assert [m.key for m in intact] == [good.key]
    assert published(root) == [good.key]
    assert tmp_entries(root) == []
    assert fresh.lookup(f"file://{bad_src}") is None
    assert fresh.used_bytes() == good.size_bytes
    # The damaged one is fetched again on demand.
    refetched = await fresh.fetch(f"file://{bad_src}")
    assert read_model(refetched.path) == read_model(bad_src)


async def test_manifest_of_another_source_is_not_trusted(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    src = tmp_path / "src"
    make_model(src)
    store = ModelStore(root, options=SMALL)
    model = await store.fetch(f"file://{src}")
    manifest = json.loads((model.path / MANIFEST_NAME).read_text())
    manifest["files"].append({"path": "../escape", "size": 1, "sha256": "0" * 64})
    (model.path / MANIFEST_NAME).write_text(json.dumps(manifest))

    assert ModelStore(root).scan() == []
    assert published(root) == []


async def test_remove_deletes_the_model(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_model(src)
    store = ModelStore(tmp_path / "cache", options=SMALL)
    uri = f"file://{src}"
    model = await store.fetch(uri)

    assert store.remove(uri) is True
    assert not model.path.exists()
    assert store.lookup(uri) is None
    assert store.used_bytes() == 0
    assert store.remove(uri) is False
    assert tmp_entries(tmp_path / "cache") == []


async def test_errors_are_cache_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    for uri in ("ftp://x/y", f"file://{tmp_path}/missing"):
        with pytest.raises(CacheError):
            await store.fetch(uri)


def test_hashes_are_fed_as_bytes_arrive_and_read_back_only_when_parts_overtake(
    tmp_path: Path,
) -> None:
    """A part at the hash frontier is hashed from the receive buffer; a part that completes
    ahead of it is read back from the page cache once the frontier reaches it."""
    import threading

    from nodecache.cache.fetch import Transfer
    from nodecache.cache.journal import Journal
    from nodecache.cache.sources import open_source

    source_dir = tmp_path / "src"
    files = {"small.bin": os.urandom(50_000), "big.bin": os.urandom(3 * 256 * 1024 + 17)}
    for rel, data in files.items():
        (source_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (source_dir / rel).write_bytes(data)
    options = FetchOptions(chunk_size=64 * 1024, part_size=256 * 1024, fsync=False, retries=0)
    source = open_source(f"file://{source_dir}", chunk_size=options.chunk_size, timeout=5)
    folder = tmp_path / "partial"
    folder.mkdir()
    listing = source.list_files()
    transfer = Transfer(
        source,
        listing,
        folder,
        Journal(folder, source.uri, options.part_size),
        options,
        on_bytes=lambda n: None,
        abort=threading.Event(),
    )
    transfer.prepare()
    parts = {(job.remote.path, part.index): (job, part) for job, part in transfer.pending()}
    # big.bin's part 1 completes before part 0; parts 2 and 3 arrive at the frontier.
    for key in [("big.bin", 1), ("big.bin", 0), ("big.bin", 2), ("big.bin", 3), ("small.bin", 0)]:
        transfer.run_part(*parts[key])

    fetched = {f.path: f for f in transfer.finish()}
    transfer.close()

    for rel, data in files.items():
        assert fetched[rel].sha256 == hashlib.sha256(data).hexdigest()
        assert (folder / rel).read_bytes() == data
    assert transfer.read_back_bytes() == {"big.bin": 256 * 1024, "small.bin": 0}
