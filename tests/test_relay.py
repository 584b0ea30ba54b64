"""The router's relay to a worker: keep-alive reuse, stale connections, broken answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from nodecache.serve.relay import RelayBusy, RelayError, UnsafeRequest, WorkerLink


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


class ScriptedWorker:
    """A raw Unix-socket server that answers every request head with the given bytes."""

    def __init__(self, path: str, answer: bytes) -> None:
        self.path, self.answer = path, answer
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(self.answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def __aenter__(self) -> ScriptedWorker:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_interim_answers_are_skipped_not_taken_as_the_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sock")
    async with ScriptedWorker(path, b"HTTP/1.1 100 Continue\r\n\r\n" + OK) as worker:
        link = WorkerLink(path)
        for _ in range(3):
            assert await link.request("POST", "/x", b"body") == (
                200, [("Content-Length", "2")], b"ok"
            )  # fmt: skip
        assert worker.connections == 1
        await link.close()


async def test_a_connection_with_bytes_past_the_answer_is_never_reused(tmp_path: Path) -> None:
    """Two answers to one request: the second must not become the next caller's answer."""
    path = str(tmp_path / "w.sock")
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother"
    async with ScriptedWorker(path, OK + second) as worker:
        link = WorkerLink(path)
        for _ in range(3):
            status, _, payload = await link.request("GET", "/x", b"")
            assert (status, payload) == (200, b"ok")
        assert worker.connections == 3
        await link.close()


async def test_a_cancelled_request_never_returns_its_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sock")
    async with ScriptedWorker(path, OK) as worker:
        link = WorkerLink(path)
        hold = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await hold.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")

        assert worker.server is not None
        worker.server.close()
        server = await asyncio.start_unix_server(slow, path)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(link.request("GET", "/x", b""), 0.2)
        hold.set()
        server.close()
        await asyncio.sleep(0.05)
        assert link._idle == []  # the late answer can reach nobody
        await link.close()


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/v2/models/m\r\nHost: x", []),
        ("GET", "/v2/models/m HTTP/1.1", []),
        ("GET", "/v2/models/é", []),
        ("GET", "relative", []),
        ("HEAD", "/v2/models/m", []),
        ("GET\r\n", "/x", []),
        ("GET", "/x", [("X-A", "1\r\nX-Injected: 1")]),
        ("GET", "/x", [("X-A: b", "1")]),
        ("GET", "/x", [("X-A", "ü")]),
    ],
)
async def test_nothing_unsafe_reaches_the_worker(
    tmp_path: Path, method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    path = str(tmp_path / "w.sock")
    async with ScriptedWorker(path, OK) as worker:
        link = WorkerLink(path)
        with pytest.raises(UnsafeRequest):
            await link.request(method, target, b"", headers)
        assert worker.connections == 0
        await link.close()


async def test_a_busy_worker_is_refused_at_once_not_queued(tmp_path: Path) -> None:
    path = str(tmp_path / "w.sock")
    never = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()

    server = await asyncio.start_unix_server(stall, path)
    link = WorkerLink(path, limit=2)
    pending = [asyncio.create_task(link.request("GET", "/x", b"")) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(RelayBusy):
        await link.request("GET", "/x", b"")
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    server.close()
    await link.close()
