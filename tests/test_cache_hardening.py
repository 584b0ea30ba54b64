"""The disk tier against hostile or careless sources, with real servers on loopback.

Quota on bytes written (endless and lying sources), credentials that never leak (redacted
URIs, no signature across a redirect to another host), cache files no more readable than the
policy, and one agent per cache dir.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from support import ROOT, Agent, SlowHttpSource, declaration, uds_request

from nodecache.cache import (
    FetchOptions,
    InsufficientSpaceError,
    IntegrityError,
    ModelStore,
    SizeLimitError,
    parse_file_mode,
    redact_uri,
)
from nodecache.cache.sources.httpclient import HttpRanges

MiB = 1 << 20
OPTS = FetchOptions(
    chunk_size=64 * 1024,
    part_size=4 * MiB,
    fsync=False,
    retries=1,
    backoff_base=0.01,
    backoff_max=0.02,
    journal_interval=0.05,
)
SECRET = "c2VjcmV0LXNpZ25hdHVyZQ"


# ---- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    """(method, path with query, headers with lowercase names) of every request."""
    sent: list[int] = field(default_factory=lambda: [0])
    """Body bytes written to clients so far."""


Handler = Callable[[web.Request, Server], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    """Start aiohttp servers on loopback (each on its own port) that record requests."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Server:
        server = Server("")

        async def record(request: web.Request) -> web.StreamResponse:
            headers = {k.lower(): v for k, v in request.headers.items()}
            server.requests.append((request.method, request.path_qs, headers))
            return await handler(request, server)

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", record)
        runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        server.url = f"http://{host}:{port}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


async def endless(request: web.Request, server: Server) -> web.StreamResponse:
    """Chunked bytes, no length anywhere, forever (until the client hangs up)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    if request.method == "GET":
        chunk = b"\x07" * 65536
        try:
            while True:
                await resp.write(chunk)
                server.sent[0] += len(chunk)
        except ConnectionError:  # the client stopped reading, as it should
            pass
    return resp


def tree(root: Path) -> list[tuple[Path, int]]:
    """Every file and folder under ``root`` with its permission bits."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            out.append((path, stat.S_IMODE(path.lstat().st_mode)))
    return out


def assert_modes(root: Path, file_mode: int, dir_mode: int) -> None:
    found = tree(root)
    assert found
    loose = [
        (str(p.relative_to(root)), oct(m))
        for p, m in found
        if m & ~(dir_mode if p.is_dir() else file_mode)
    ]
    assert not loose, f"more readable than {file_mode:o}/{dir_mode:o}: {loose}"


# ---- 1. quota on bytes written -------------------------------------------------------------


async def test_endless_chunked_source_stops_at_the_declared_size(
    tmp_path: Path, serve: Callable[[Handler], Awaitable[Server]]
) -> None:
    source = await serve(endless)
    store = ModelStore(tmp_path / "cache", options=OPTS)

    with pytest.raises(SizeLimitError, match=r"source sent more than modelSize 1\.0 MiB"):
        await store.fetch(f"{source.url}/model.bin", max_bytes=MiB)

    # Stopped at the allowance (modelSize + 25%), not a byte written past it, and removed.
    assert store.stats.bytes_fetched <= MiB * 5 // 4
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    assert store.used_bytes() == 0


async def test_endless_source_stops_at_the_cache_size(
    tmp_path: Path, serve: Callable[[Handler], Awaitable[Server]]
) -> None:
    source = await serve(endless)
    store = ModelStore(tmp_path / "cache", options=OPTS, limit_bytes=2 * MiB)

    with pytest.raises(InsufficientSpaceError, match=r"more than the cache had room for"):
        await store.fetch(f"{source.url}/model.bin")

    assert store.stats.bytes_fetched <= 2 * MiB
    assert store.used_bytes() == 0


async def test_a_listing_over_the_declared_size_is_refused_before_downloading(
    tmp_path: Path,
) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"\x01" * (2 * MiB))
    store = ModelStore(tmp_path / "cache", options=OPTS)

    with pytest.raises(SizeLimitError, match=r"lists 2\.0 MiB, more than modelSize 1\.0 MiB"):
        await store.fetch(src.as_uri(), max_bytes=MiB)
    assert store.stats.bytes_fetched == 0
    # Within the tolerance it is fetched.
    assert (await store.fetch(src.as_uri(), max_bytes=int(1.7 * MiB))).size_bytes == 2 * MiB


async def test_a_body_longer_than_its_announced_length_is_an_error(
    tmp_path: Path, serve: Callable[[Handler], Awaitable[Server]]
) -> None:
    announced = 100_000

    async def liar(request: web.Request, server: Server) -> web.StreamResponse:
        headers = {"Accept-Ranges": "none", "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(announced)})
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(40):  # 2.5 MiB where 100 kB were announced
            await resp.write(b"\x02" * 65536)
        return resp

    source = await serve(liar)
    store = ModelStore(tmp_path / "cache", options=OPTS)

    with pytest.raises(IntegrityError, match="sent more than the 100000 bytes it announced"):
        await store.fetch(f"{source.url}/model.bin")
    assert store.used_bytes() == 0


def test_agent_refuses_an_endless_source_past_its_model_size(agent: Agent, tmp_path: Path) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await endless(request, Server(""))

    with ServerThread(handle) as url:
        agent.start()
        agent.declare("big.yaml", declaration("big", f"{url}/model.bin", size="1Mi"))
        failed = agent.wait_state("big", "Error")
        assert "more than modelSize 1.0 MiB" in failed["error"], failed["error"]
        cache = agent.cache_dir
        assert list((cache / "tmp").iterdir()) == []
        assert list((cache / "models").iterdir()) == []


class ServerThread:
    """An HTTP server answering every path with ``handler``, on an event loop in a thread of
    its own, for tests that run a blocking agent."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        import threading

        self._handler = handler
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Future[None] | None = None

    def __enter__(self) -> str:
        self._thread.start()

        async def begin() -> str:
            self._stop = asyncio.Event()
            ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._serve(ready, self._stop))
            return await ready

        return asyncio.run_coroutine_threadsafe(begin(), self._loop).result(10)

    async def _serve(self, ready: asyncio.Future[str], stop: asyncio.Event) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        ready.set_result(f"http://{host}:{port}")
        await stop.wait()
        await runner.cleanup()

    def __exit__(self, *exc: object) -> None:
        async def end() -> None:
            assert self._stop is not None and self._task is not None
            self._stop.set()
            await self._task

        asyncio.run_coroutine_threadsafe(end(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ---- 2. credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "https://bucket.s3.amazonaws.com/m.onnx?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential=AKIAEXAMPLE%2F20250101&X-Amz-Security-Token={SECRET}"
        f"&X-Amz-Signature={SECRET}",
        f"https://storage.googleapis.com/b/m.onnx?X-Goog-Signature={SECRET}&X-Goog-Credential=x",
        f"https://acct.blob.core.windows.net/c/m.onnx?sv=2022-11-02&sig={SECRET}&se=2030",
        f"https://user:{SECRET}@host.example/m.onnx",
        f"https://host.example/m.onnx?token={SECRET}#frag",
        f"not a uri at all ?access_token={SECRET}",
    ],
)
def test_redact_removes_every_query_and_user_info(uri: str) -> None:
    shown = redact_uri(uri)
    assert SECRET not in shown and "AKIA" not in shown
    assert "m.onnx" in shown or "not a uri" in shown


def test_presigned_url_never_reaches_status_or_logs(agent: Agent, tmp_path: Path) -> None:
    """A presigned source that fails: status (source, error) and logs hold no signature."""

    async def deny(request: web.Request) -> web.Response:
        return web.Response(status=403, text=f"denied {request.path_qs}")

    with ServerThread(deny) as url:
        presigned = (
            f"{url}/bucket/model.onnx?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SECRET}"
            f"&X-Amz-Security-Token={SECRET}"
        )
        agent.start()
        agent.declare("signed.yaml", declaration("signed", presigned))
        failed = agent.wait_state("signed", "Error")
        code, _, body = _raw_status(agent)
    assert code == 200
    assert failed["source"].endswith("/bucket/model.onnx?***"), failed["source"]
    assert SECRET not in body and "AKIAEXAMPLE" not in body
    log = agent.log.read_text()
    assert "model.onnx" in log and SECRET not in log and "AKIAEXAMPLE" not in log


def _raw_status(agent: Agent) -> tuple[int, dict[str, str], str]:
    code, headers, body = uds_request(agent.socket, "GET", "/nodecache/v1/status")
    return code, headers, body.decode()


SIGNING_HEADERS = {"authorization", "x-amz-security-token", "x-amz-date", "x-amz-content-sha256"}


def s3_credentials(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": f"session-{SECRET}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def bytes_answer(request: web.Request, data: bytes) -> web.Response:
    """200, or 206 for a ``bytes=a-b`` Range, of ``data``."""
    spec = request.headers.get("Range", "")
    headers = {"ETag": '"abc123"', "Content-Type": "application/octet-stream"}
    if not spec.startswith("bytes="):
        return web.Response(body=data, headers=headers)
    first, _, last = spec[len("bytes=") :].partition("-")
    start, end = int(first), (int(last) + 1 if last else len(data))
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
    return web.Response(status=206, body=data[start:end], headers=headers)


async def test_s3_credentials_never_follow_a_redirect_to_another_host(
    tmp_path: Path, serve: Callable[[Handler], Awaitable[Server]]
) -> None:
    data = os.urandom(300_000)

    async def elsewhere(request: web.Request, server: Server) -> web.StreamResponse:
        return bytes_answer(request, data)

    other = await serve(elsewhere)

    async def endpoint(request: web.Request, server: Server) -> web.StreamResponse:
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data)), "ETag": '"abc123"'})
        if request.path == "/bucket/model.bin":  # same host first, then another host
            raise web.HTTPTemporaryRedirect("/bucket/moved.bin")
        raise web.HTTPTemporaryRedirect(f"{other.url}/cdn/model.bin?X-Signed=by-the-server")

    s3 = await serve(endpoint)
    store = ModelStore(tmp_path / "cache", options=OPTS)

    model = await store.fetch("s3://bucket/model.bin", credentials=s3_credentials(s3.url))

    assert (model.path / "model.bin").read_bytes() == data
    gets = [(path, h) for method, path, h in s3.requests if method == "GET"]
    assert [p for p, _ in gets] == ["/bucket/model.bin", "/bucket/moved.bin"]
    for _, headers in gets:  # the same host: signed each time, for its own path
        assert "authorization" in headers and "x-amz-security-token" in headers
    assert len(other.requests) == 1
    _, path, received = other.requests[0]
    assert path == "/cdn/model.bin?X-Signed=by-the-server"
    leaked = SIGNING_HEADERS & set(received)
    assert not leaked, f"sent to another host: {leaked}"
    assert SECRET not in repr(received) and "AKIAEXAMPLE" not in repr(received)
    assert received.get("range") == f"bytes=0-{len(data) - 1}"  # the request itself is kept


async def test_no_signing_header_returns_after_leaving_the_origin(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    """origin -> other host -> origin again: only the first hop is signed (the other host
    chose the path of the third, so it gets no credentials either)."""
    data = b"x" * 1000

    async def origin(request: web.Request, server: Server) -> web.StreamResponse:
        if request.path == "/start":
            raise web.HTTPFound(f"{other.url}/bounce")
        return bytes_answer(request, data)

    async def bounce(request: web.Request, server: Server) -> web.StreamResponse:
        raise web.HTTPFound(f"{first.url}/chosen-by-the-other-host")

    other = await serve(bounce)
    first = await serve(origin)
    http = HttpRanges(5.0)
    got = bytearray()

    def sink(offset: int, chunk: memoryview) -> None:
        got[offset : offset + len(chunk)] = chunk

    def sign(method: str, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}"}

    try:
        await asyncio.to_thread(
            http.get, f"{first.url}/start", 0, None, sink, chunk_size=4096, sign=sign
        )
    finally:
        http.close()
    assert bytes(got) == data
    signed = [p for _, p, h in first.requests + other.requests if "authorization" in h]
    assert signed == ["/start"]
    assert all("cookie" not in h for _, _, h in other.requests + first.requests[1:])


async def test_s3fs_listing_does_not_follow_a_redirect_with_credentials(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    """The s3fs (botocore) path: aiobotocore let aiohttp follow a redirect to another host,
    which dropped only ``Authorization`` and sent the session token on; now the redirect is
    not followed and the listing fails with a clear error."""
    from nodecache.cache.sources import translate_error
    from nodecache.cache.sources.s3fs_fallback import S3fsSource

    async def record(request: web.Request, server: Server) -> web.StreamResponse:
        return web.Response(text="")

    other = await serve(record)

    async def endpoint(request: web.Request, server: Server) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"{other.url}{request.path_qs}")

    s3 = await serve(endpoint)

    def listing() -> None:
        source = S3fsSource(
            "s3://bucket/model", chunk_size=65536, timeout=5.0, credentials=s3_credentials(s3.url)
        )
        try:
            source.list_files()
        finally:
            source.close()

    with pytest.raises(Exception) as refused:  # whatever botocore raises
        await asyncio.to_thread(listing)
    assert SECRET not in str(translate_error(refused.value, "s3://bucket/model"))
    assert s3.requests, "the endpoint was never asked"
    assert other.requests == []


# ---- 3. modes ------------------------------------------------------------------------------


def make_source(root: Path) -> Path:
    for rel, data in {"model.onnx": b"weights" * 1000, "sub/deeper/vocab.txt": b"a\nb\n"}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o666)  # a source's own modes are not copied
    return root


async def test_cache_files_and_folders_are_no_more_readable_than_the_policy(
    tmp_path: Path,
) -> None:
    source = make_source(tmp_path / "source")
    old = os.umask(0)  # what we create must not depend on the umask
    try:
        store = ModelStore(tmp_path / "cache", options=OPTS)
        await store.fetch(source.as_uri())
        assert_modes(tmp_path / "cache", 0o640, 0o750)
        private = ModelStore(tmp_path / "private", options=OPTS, file_mode=0o600)
        await private.fetch(source.as_uri())
        assert_modes(tmp_path / "private", 0o600, 0o700)
    finally:
        os.umask(old)


async def test_partial_downloads_and_journals_follow_the_policy(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.bin").write_bytes(os.urandom(2 * MiB))
    old = os.umask(0)
    try:
        with SlowHttpSource(source, bytes_per_second=1 * MiB) as http:
            store = ModelStore(tmp_path / "cache", options=OPTS)
            task = asyncio.create_task(store.fetch(http.url + "model.bin"))
            partial = tmp_path / "cache" / "tmp"

            def journaled() -> bool:
                return any(partial.rglob(".nodecache-journal.json"))

            while not journaled():
                await asyncio.sleep(0.02)
            assert_modes(tmp_path / "cache", 0o640, 0o750)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        os.umask(old)


async def test_agent_start_up_scan_tightens_copies_made_under_a_looser_policy(
    tmp_path: Path,
) -> None:
    source = make_source(tmp_path / "source")
    loose = ModelStore(tmp_path / "cache", options=OPTS, file_mode=0o644)
    await loose.fetch(source.as_uri())
    prefetch_like = ModelStore(tmp_path / "cache", options=OPTS)
    prefetch_like.scan(tighten=False)  # a prefetch leaves the agent's modes alone
    assert any(mode & 0o004 for _, mode in tree(tmp_path / "cache"))
    ModelStore(tmp_path / "cache", options=OPTS).scan()
    assert_modes(tmp_path / "cache", 0o640, 0o750)


@pytest.mark.parametrize(
    ("text", "expected"), [("0640", 0o640), ("640", 0o640), ("0o600", 0o600), ("0644", 0o644)]
)
def test_cache_mode_parses_octal(text: str, expected: int) -> None:
    assert parse_file_mode(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [("0755", "only read and write"), ("0440", "owner must"), ("rw-r-----", "octal"),
     ("4640", "only read and write"), ("", "octal")],
)  # fmt: skip
def test_cache_mode_refuses_what_it_cannot_mean(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_file_mode(text)


def test_agent_cache_mode_flag_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from nodecache.agent.cli import build_parser

    assert build_parser().parse_args(["agent", "--cache-mode", "0600"]).cache_mode == 0o600
    assert build_parser().parse_args(["agent"]).cache_mode == 0o640
    with pytest.raises(SystemExit) as usage:
        build_parser().parse_args(["agent", "--cache-mode", "0755"])
    assert usage.value.code == 2
    assert "--cache-mode" in capsys.readouterr().err


def test_prefetch_writes_with_its_cache_mode(tmp_path: Path) -> None:
    source = make_source(tmp_path / "source")
    done = subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "prefetch", source.as_uri(),
         "--cache-dir", str(tmp_path / "cache"), "--cache-mode", "0600", "--progress", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_modes(tmp_path / "cache", 0o600, 0o700)


def test_prefetch_refuses_a_source_over_its_model_size(tmp_path: Path) -> None:
    source = make_source(tmp_path / "source")  # 7 kB
    done = subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "prefetch", source.as_uri(),
         "--cache-dir", str(tmp_path / "cache"), "--model-size", "4Ki", "--progress", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "more than modelSize 4.0 KiB (5.0 KiB with the 25% tolerance)" in done.stderr
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# ---- 4. one agent per cache dir -----------------------------------------------------------


def test_one_agent_per_cache_dir_and_prefetch_still_shares_it(
    agent: Agent, tmp_path: Path, mlp_dir: Path
) -> None:
    agent.start()
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    models = sorted(p.name for p in (agent.cache_dir / "models").iterdir())
    assert models

    # A second agent declaring nothing would take the first one's models for garbage.
    second = tmp_path / "second"
    (second / "declarations").mkdir(parents=True)
    command = [
        sys.executable, "-m", "nodecache.agent.cli", "agent",
        "--declarations", str(second / "declarations"),
        "--cache-dir", str(agent.cache_dir),
        "--socket-dir", str(second / "run"),
        "--metrics-port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the second agent kept running on a cache dir another agent holds")
    assert proc.returncode != 0
    assert agent.proc is not None
    assert err.strip() == (
        f"nodecache: cache dir {agent.cache_dir} is in use by another agent (pid {agent.proc.pid})"
    ), err
    assert sorted(p.name for p in (agent.cache_dir / "models").iterdir()) == models

    # A prefetch shares the folder with the running agent, by design.
    source = make_source(tmp_path / "source")
    done = subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "prefetch", source.as_uri(),
         "--cache-dir", str(agent.cache_dir), "--progress", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert (folder / "model.onnx").read_bytes() == (source / "model.onnx").read_bytes()
    assert agent.proc.poll() is None
    assert agent.model("mlp")["state"] == "Warm"
