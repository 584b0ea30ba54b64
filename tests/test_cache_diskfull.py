"""A real full disk: a 1 MiB tmpfs as the cache directory (skipped where mount is refused)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from nodecache.cache import FetchOptions, InsufficientSpaceError, ModelStore

OPTS = FetchOptions(chunk_size=64 * 1024, part_size=256 * 1024, fsync=False, retries=1)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
async def unsized_http() -> AsyncIterator[str]:
    """Serves 3 MiB with chunked encoding and no length anywhere."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method == "GET":
            for _ in range(48):
                await resp.write(b"\x01" * 65536)
        return resp

    app = web.Application()
    app.router.add_route("*", "/model.bin", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/model.bin"
    await runner.cleanup()


async def test_model_larger_than_the_disk_is_refused_before_download(
    tmp_path: Path, tiny_disk: Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    store = ModelStore(tiny_disk / "cache", options=OPTS)

    with pytest.raises(InsufficientSpaceError, match=r"needs 3\.0 MiB, limit none, free"):
        await store.fetch(f"file://{src}")

    assert list((tiny_disk / "cache" / "tmp").iterdir()) == []


async def test_disk_filling_up_mid_download_cleans_up_and_says_so(
    tiny_disk: Path, unsized_http: str
) -> None:
    store = ModelStore(tiny_disk / "cache", options=OPTS)

    with pytest.raises(InsufficientSpaceError, match="disk full"):
        await store.fetch(unsized_http)

    assert list((tiny_disk / "cache" / "tmp").iterdir()) == []
    assert list((tiny_disk / "cache" / "models").iterdir()) == []
    # The disk is usable again: the partial did not stay behind.
    (tiny_disk / "probe").write_bytes(b"x" * 500_000)
