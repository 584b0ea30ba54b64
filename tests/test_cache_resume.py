"""Resume: a fetching process killed at random points picks up from the bytes on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from nodecache.cache import MANIFEST_NAME, FetchOptions, ModelStore

SIZE = 2 * 1024 * 1024 + 12_345
PART = 256 * 1024
OPTS = dict(chunk_size=16 * 1024, part_size=PART, concurrency=2, fsync=False, journal_interval=0.02)

CHILD = """
import asyncio, sys
from pathlib import Path
from nodecache.cache import FetchOptions, ModelStore
opts = FetchOptions(**{opts!r})
asyncio.run(ModelStore(Path(sys.argv[1]), options=opts).fetch(sys.argv[2]))
"""


@dataclass
class SlowServer:
    url: str
    data: bytes
    served: int = 0


@pytest.fixture
async def slow_server() -> AsyncIterator[SlowServer]:
    """Serves one object with ranges and a strong ETag, slowly, counting bytes sent."""
    data = os.urandom(SIZE)
    etag = hashlib.md5(data).hexdigest()
    server = SlowServer(url="", data=data)

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(SIZE)})
        start, end = 0, SIZE
        status = 200
        if request.http_range.start is not None:
            start = request.http_range.start
            end = request.http_range.stop if request.http_range.stop is not None else SIZE
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{SIZE}"
        headers["Content-Length"] = str(end - start)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        try:
            for pos in range(start, end, 16 * 1024):
                chunk = data[pos : min(pos + 16 * 1024, end)]
                await resp.write(chunk)
                server.served += len(chunk)
                await asyncio.sleep(0.01)
        except ConnectionResetError:
            pass  # the client was killed
        return resp

    app = web.Application()
    app.router.add_route("*", "/m/model.bin", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/m/model.bin"
    yield server
    await runner.cleanup()


def recorded_parts(root: Path, key: str) -> int:
    journal = root / "tmp" / f"{key}.partial" / ".nodecache-journal.json"
    try:
        files = json.loads(journal.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(len(entry["parts"]) for entry in files.values())


async def test_killed_fetches_resume_and_publish_a_complete_model(
    tmp_path: Path, slow_server: SlowServer
) -> None:
    root = tmp_path / "cache"
    key = ModelStore.key_for(slow_server.url)
    script = CHILD.format(opts=OPTS)
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for round_, target in enumerate((1, 3, 5)):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(root), slow_server.url, env=env
        )
        # Kill it somewhere in the middle, a bit later each round.
        for _ in range(600):
            if recorded_parts(root, key) >= target or child.returncode is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0, 0.03))
        if child.returncode is None:
            child.send_signal(signal.SIGKILL)
        await child.wait()
        # Whatever the moment of the kill, nothing incomplete is ever published.
        store = ModelStore(root)
        store.scan()
        model = store.lookup(slow_server.url)
        if model is not None:
            assert (model.path / "model.bin").read_bytes() == slow_server.data, round_
    before = slow_server.served
    assert recorded_parts(root, key) > 0
    seen: list[int] = []

    store = ModelStore(root, options=FetchOptions(**OPTS))
    store.scan()  # a restart keeps resumable partials
    model = await store.fetch(slow_server.url, progress=lambda d, t: seen.append(d))

    assert (model.path / "model.bin").read_bytes() == slow_server.data
    manifest = json.loads((model.path / MANIFEST_NAME).read_text())
    assert manifest["files"][0]["sha256"] == hashlib.sha256(slow_server.data).hexdigest()
    assert seen[0] > 0  # resumed bytes counted up front
    assert slow_server.served - before <= SIZE - seen[0] + 2 * PART
    assert slow_server.served < 3 * SIZE  # four attempts, far less than four downloads
    assert list((root / "tmp").iterdir()) == []
