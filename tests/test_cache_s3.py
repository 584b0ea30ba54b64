"""The model store against a real S3-compatible server (SeaweedFS) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from object_stores import ACCESS_KEY, SECRET_KEY, S3Server
from support import SMALL

from nodecache.cache import MANIFEST_NAME, FetchError, FetchOptions, IntegrityError, ModelStore


def upload(server: S3Server, prefix: str, files: dict[str, bytes]) -> None:
    fs = server.client()
    for rel, data in files.items():
        fs.pipe_file(f"{server.bucket}/{prefix}/{rel}", data)


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"layers": 3}',
        "weights/model-00001.safetensors": os.urandom(700_001),
        "weights/model-00002.safetensors": os.urandom(65_536),
        "tokenizer/vocab.txt": b"hello\nworld\n",
    }


def read_model(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


async def test_fetch_s3_folder_byte_for_byte(tmp_path: Path, s3: S3Server) -> None:
    files = model_files()
    upload(s3, "folder-model", files)
    store = ModelStore(tmp_path / "cache", options=SMALL)
    seen: list[tuple[int, int | None]] = []

    model = await store.fetch(
        f"s3://{s3.bucket}/folder-model/", progress=lambda d, t: seen.append((d, t))
    )

    assert read_model(model.path) == files
    for f in model.files:  # s3fs uploads with a CRC32 (botocore's default): verified by it
        assert f.checksum == f"crc32:{zlib.crc32(files[f.path]):08x}"
    assert seen[-1] == (model.size_bytes, model.size_bytes)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


async def test_fetch_s3_single_object(tmp_path: Path, s3: S3Server) -> None:
    data = os.urandom(1_234_567)
    s3.client().pipe_file(f"{s3.bucket}/single/model.onnx", data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"s3://{s3.bucket}/single/model.onnx")

    assert [f.path for f in model.files] == ["model.onnx"]
    assert (model.path / "model.onnx").read_bytes() == data


async def test_missing_s3_object_is_permanent(tmp_path: Path, s3: S3Server) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"s3://{s3.bucket}/no/such/model.onnx")
    assert info.value.permanent
    assert list((tmp_path / "cache" / "models").iterdir()) == []


async def test_wrong_secret_is_permanent_and_never_shown(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3, "guarded", {"w.bin": b"w" * 10})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"s3://{s3.bucket}/guarded/")

    assert info.value.permanent
    message = str(info.value)
    assert "wrong-secret-value" not in message
    assert SECRET_KEY not in message
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# ---- fault injection through a proxy in front of the S3 server ------------------------------


@dataclass
class FaultProxy:
    """An HTTP proxy to the S3 server that breaks ranged GETs as told, one fault per request."""

    endpoint: str
    faults: list[str]
    injected: list[str]


@pytest.fixture
async def fault_proxy(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FaultProxy]:
    import aiohttp
    from aiohttp import web

    upstream = s3_server.endpoint
    proxy = FaultProxy(endpoint="", faults=[], injected=[])
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        fault = ""
        if request.method == "GET" and "Range" in request.headers and proxy.faults:
            fault = proxy.faults.pop(0)
            proxy.injected.append(fault)
        if fault == "503":
            body = "<Error><Code>SlowDown</Code><Message>Please reduce your rate</Message></Error>"
            return web.Response(status=503, text=body, content_type="application/xml")
        if fault == "stall":
            await asyncio.sleep(2.0)
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        # Keep Host: S3 signatures cover it.
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_HEADERS or k.lower() == "host"
        }
        async with session.request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as up:
            body = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
            if request.method == "HEAD" and "Content-Length" in up.headers:
                out_headers["Content-Length"] = up.headers["Content-Length"]
        if fault == "corrupt" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if fault == "reset":
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        return web.Response(status=up.status, body=body, headers=out_headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    proxy.endpoint = f"http://{host}:{port}"
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    await session.close()
    await runner.cleanup()


HOP_HEADERS = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "content-encoding",
}


async def test_resets_throttling_and_stalls_are_retried_to_identical_bytes(
    tmp_path: Path, s3_server: S3Server, fault_proxy: FaultProxy
) -> None:
    files = model_files()
    upload(s3_server, "flaky-model", files)
    fault_proxy.faults = ["reset", "503", "stall", "reset", "503"]
    options = FetchOptions(
        chunk_size=64 * 1024,
        part_size=256 * 1024,
        fsync=False,
        timeout=0.5,
        retries=6,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    store = ModelStore(tmp_path / "cache", options=options)

    model = await store.fetch(f"s3://{s3_server.bucket}/flaky-model")

    assert read_model(model.path) == files
    assert fault_proxy.injected == ["reset", "503", "stall", "reset", "503"]
    assert store.stats.retries >= 5


async def test_corrupted_bytes_fail_the_crc32_check_and_are_not_published(
    tmp_path: Path, s3_server: S3Server, fault_proxy: FaultProxy
) -> None:
    data = os.urandom(100_000)
    s3_server.client().pipe_file(f"{s3_server.bucket}/corrupt/model.onnx", data)
    fault_proxy.faults = ["corrupt"]
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match="crc32 "):
        await store.fetch(f"s3://{s3_server.bucket}/corrupt/model.onnx")

    assert list((tmp_path / "cache" / "models").iterdir()) == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    # The next attempt (no fault) succeeds from scratch.
    model = await store.fetch(f"s3://{s3_server.bucket}/corrupt/model.onnx")
    assert (model.path / "model.onnx").read_bytes() == data


async def test_permanent_errors_are_not_retried(
    tmp_path: Path, s3_server: S3Server, fault_proxy: FaultProxy
) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"s3://{s3_server.bucket}/nothing/here.bin")
    assert info.value.permanent
    assert store.stats.retries == 0


# ---- credentials from a Secret or a credentials file ------------------------------------------


async def test_credentials_given_explicitly_override_the_environment(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3_server, "secret-model", {"w.bin": b"w" * 1000})
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"s3://{s3_server.bucket}/secret-model", credentials=s3_server.env())

    assert (model.path / "w.bin").read_bytes() == b"w" * 1000


async def test_credentials_file_and_profile(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3_server, "profile-model", {"w.bin": b"p" * 10})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n\n"
        f"[ci]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(
        f"s3://{s3_server.bucket}/profile-model",
        credentials={
            "AWS_SHARED_CREDENTIALS_FILE": str(creds),
            "AWS_PROFILE": "ci",
            "AWS_ENDPOINT_URL": s3_server.endpoint,
        },
    )

    assert (model.path / "w.bin").read_bytes() == b"p" * 10


async def test_wrong_explicit_secret_is_permanent_and_masked(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload(s3_server, "masked", {"w.bin": b"m"})
    bad = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "explicit-wrong-secret-123"}
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"s3://{s3_server.bucket}/masked/w.bin", credentials=bad)

    assert info.value.permanent
    assert "explicit-wrong-secret-123" not in str(info.value)
    assert "explicit-wrong-secret-123" not in repr(info.value)


# ---- the signed fast path and its fallback --------------------------------------------------


def test_sigv4_matches_botocore() -> None:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from nodecache.cache.sigv4 import SigV4, canonical_query

    url = "http://127.0.0.1:8333/models/a%20b%2Bc/%C3%BC.bin?" + canonical_query(
        {"list-type": "2", "prefix": "x y/", "encoding-type": "url"}
    )
    for token in (None, "session-token"):
        for _ in range(5):  # botocore signs at the current second: retry across a tick
            ours = SigV4("AKID", "SECRET", token, "eu-west-1").headers("GET", url)
            request = AWSRequest(method="GET", url=url, headers={})
            request.headers["X-Amz-Content-SHA256"] = ours["x-amz-content-sha256"]
            auth = S3SigV4Auth(Credentials("AKID", "SECRET", token), "s3", "eu-west-1")
            auth.add_auth(request)
            if request.headers["X-Amz-Date"] == ours["x-amz-date"]:
                break
        assert ours["Authorization"] == request.headers["Authorization"]
        assert ours.get("x-amz-security-token") == token


async def test_odd_key_names_and_paged_listing(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nodecache.cache.sources.s3

    files = {f"part {i}+x/ü-{i}.bin": os.urandom(1000 + i) for i in range(5)}
    upload(s3, "odd names", files)
    monkeypatch.setattr(nodecache.cache.sources.s3, "S3_PAGE", 2)  # three pages
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"s3://{s3.bucket}/odd names/")

    assert read_model(model.path) == files


async def test_credentials_from_botocores_chain_take_the_fast_path(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporary credentials (here from ``credential_process``, as from web identity on EKS)
    are resolved by botocore, renewed before they expire, and used to sign our own requests:
    no s3fs, so IRSA users get the same speed as static keys."""
    from nodecache.cache.sources import open_source
    from nodecache.cache.sources.s3 import S3Source

    upload(s3, "chain-model", {"w.bin": b"c" * 5000})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    calls = tmp_path / "calls"
    process = tmp_path / "creds.py"
    # Expiring in 5 minutes: inside botocore's mandatory refresh window, so every signature
    # asks the process again; the count shows renewal happens.
    process.write_text(
        "import datetime, json, pathlib\n"
        f"p = pathlib.Path({str(calls)!r}); p.write_text(p.read_text() + 'x' if p.exists() "
        "else 'x')\n"
        "expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)\n"
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {ACCESS_KEY!r}, "
        f"'SecretAccessKey': {SECRET_KEY!r}, 'SessionToken': '', "
        "'Expiration': expires.isoformat()}))\n"
    )
    config = tmp_path / "config"
    config.write_text(f"[profile ci]\ncredential_process = {sys.executable} {process}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    uri = f"s3://{s3.bucket}/chain-model"
    assert isinstance(open_source(uri, chunk_size=65536, timeout=5), S3Source)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(uri)

    assert (model.path / "w.bin").read_bytes() == b"c" * 5000
    assert len(calls.read_text()) >= 2, "credentials were renewed, not read once"


async def test_folder_uri_with_trailing_slash_and_object_uri(tmp_path: Path, s3: S3Server) -> None:
    from nodecache.cache.sources import open_source
    from nodecache.cache.sources.s3 import S3Source

    data = os.urandom(300_000)
    upload(s3, "both", {"inner/x.bin": data})
    uri = f"s3://{s3.bucket}/both"
    assert isinstance(open_source(uri, chunk_size=65536, timeout=5), S3Source)
    store = ModelStore(tmp_path / "cache", options=SMALL)
    folder = await store.fetch(uri + "/")
    single = await store.fetch(uri + "/inner/x.bin")
    assert read_model(folder.path) == {"inner/x.bin": data}
    assert read_model(single.path) == {"x.bin": data}


async def test_bucket_region_is_learned_from_the_redirect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No region configured: a request signed for us-east-1 is answered 301 with the
    bucket's region, and everything after is signed for that region."""
    from aiohttp import web

    data = os.urandom(70_000)
    scopes: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        region = auth.split("Credential=", 1)[1].split("/")[2] if auth else ""
        scopes.append(region)
        if region != "eu-west-1":
            return web.Response(status=301, headers={"x-amz-bucket-region": "eu-west-1"})
        if request.path != "/models/regional/w.bin":
            return web.Response(status=404)
        headers = {"ETag": '"' + hashlib.md5(data).hexdigest() + '"'}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        body = data[int(first) : int(last) + 1]
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        return web.Response(status=206, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    try:
        store = ModelStore(tmp_path / "cache", options=SMALL)
        model = await store.fetch(
            "s3://models/regional/w.bin",
            credentials={
                "AWS_ACCESS_KEY_ID": "AKID",
                "AWS_SECRET_ACCESS_KEY": "SECRET",
                "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            },
        )
    finally:
        await runner.cleanup()

    assert (model.path / "w.bin").read_bytes() == data
    assert scopes[0] == "us-east-1"
    assert set(scopes[1:]) == {"eu-west-1"}


async def test_bucket_in_another_region_than_configured_is_a_permanent_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=301, headers={"x-amz-bucket-region": "eu-west-1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    store = ModelStore(tmp_path / "cache", options=SMALL)
    try:
        with pytest.raises(FetchError) as info:
            await store.fetch(
                "s3://models/elsewhere/w.bin",
                credentials={
                    "AWS_ACCESS_KEY_ID": "AKID",
                    "AWS_SECRET_ACCESS_KEY": "SECRET",
                    "AWS_DEFAULT_REGION": "us-west-2",
                    "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                },
            )
    finally:
        await runner.cleanup()

    assert info.value.permanent
    assert "eu-west-1" in str(info.value)
    assert store.stats.retries == 0
