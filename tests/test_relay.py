"""The router's relay to a worker: keep-alive reuse, stale connections, broken answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from serve.relay import RelayError, WorkerLink


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[str, list[object]]]:
    """A real aiohttp server on a Unix socket; records the connection of every request."""
    connections: list[object] = []

    async def echo(request: web.Request) -> web.Response:
        connections.append(request.transport)
        body = await request.read()
        return web.Response(
            body=body, status=201, headers={"X-Seen": request.headers.get("X-Model", "")}
        )

    async def missing(request: web.Request) -> web.Response:
        return web.json_response({"error": "no such model"}, status=404)

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"0123456789")
        assert request.transport is not None
        request.transport.abort()  # the worker dies mid-answer
        return response

    app = web.Application(client_max_size=8 << 20)
    app.router.add_post("/echo", echo)
    app.router.add_get("/missing", missing)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app, keepalive_timeout=0.2)
    await runner.setup()
    path = str(tmp_path / "w.sock")
    await web.UnixSite(runner, path).start()
    yield path, connections
    await runner.cleanup()


async def test_requests_reuse_one_connection_and_pass_everything_through(
    worker: tuple[str, list[object]],
) -> None:
    path, connections = worker
    link = WorkerLink(path)
    big = bytes(range(256)) * 4096  # 1 MiB
    for body in (b"x", b"", big, b"y"):
        status, headers, payload = await link.request("POST", "/echo", body, [("X-Model", "mlp")])
        assert (status, payload) == (201, body)
        assert ("X-Seen", "mlp") in headers
    assert len({id(c) for c in connections}) == 1
    status, _, payload = await link.request("GET", "/missing", b"")
    assert status == 404 and b"no such model" in payload
    await link.close()


async def test_a_connection_the_worker_closed_is_replaced_without_an_error(
    worker: tuple[str, list[object]],
) -> None:
    path, connections = worker
    link = WorkerLink(path)
    await link.request("POST", "/echo", b"a")
    await asyncio.sleep(0.5)  # past the worker's keep-alive timeout: it closes the connection
    status, _, payload = await link.request("POST", "/echo", b"b")
    assert (status, payload) == (201, b"b")
    assert len({id(c) for c in connections}) == 2
    await link.close()


async def test_an_answer_cut_short_is_an_error_not_a_hang(
    worker: tuple[str, list[object]],
) -> None:
    path, _ = worker
    link = WorkerLink(path)
    with pytest.raises(RelayError, match="mid-answer"):
        await asyncio.wait_for(link.request("GET", "/broken", b""), 5)
    status, _, _ = await link.request("POST", "/echo", b"ok")  # the link still works
    assert status == 201
    await link.close()


async def test_a_dead_worker_is_an_oserror(tmp_path: Path) -> None:
    link = WorkerLink(str(tmp_path / "nobody.sock"))
    with pytest.raises(OSError):
        await link.request("POST", "/echo", b"x")
