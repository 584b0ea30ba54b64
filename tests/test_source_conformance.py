"""Every source behaves the same (as fsspec's ``tests/abstract`` does for its backends).

One suite, run against each kind of source on a real server on loopback: ``file://`` (a
folder), ``http://`` (an aiohttp static server with index pages), ``s3://`` (SeaweedFS)
and ``gs://`` (fake-gcs-server), ``az://`` (Azurite). A new source adds a :class:`Backend` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from hfhub import FakeHub
from mlflow_server import MlflowServer, conformance_parts
from object_stores import GCS_BUCKET, S3Server
from oci_registry import Registry, registry_fixture  # noqa: F401 - the oci_registry fixture
from support import free_port

from nodecache.cache.errors import CacheError
from nodecache.cache.sources import RemoteFile, Source, open_source, translate_error

FILES = {
    "config.json": b'{"layers": 3}',
    "weights/model-00001.safetensors": os.urandom(300_001),
    "weights/deeper/shard.bin": os.urandom(4096),
    "tokenizer/vocab with space.txt": b"hello\nworld\n",
    "odd/plus+sign-ü.bin": os.urandom(777),
}


@dataclass
class Backend:
    """One kind of source: how to put objects under a fresh prefix, and its URI."""

    name: str
    put: Callable[[str, dict[str, bytes]], None]
    """``put(prefix, files)`` stores each file at ``prefix/<path>``."""
    uri: Callable[[str], str]
    """The source URI of ``prefix/<rest>``."""
    md5: bool = False
    """Whether the source publishes each object's MD5."""
    repository: bool = False
    """Whether a URI names a whole repository (``hf://``), never one object in it."""


class _StaticServer:
    """A folder over HTTP with index pages, ranges and ETags (aiohttp's static route)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_static("/", self.root, show_index=True)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> _StaticServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _write(root: Path, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / prefix / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("http-source")
    with _StaticServer(root) as server:
        yield root, f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def hf_hub() -> Iterator[FakeHub]:
    """A fake Hugging Face Hub (tests/hfhub.py): each prefix is a repository."""
    with FakeHub(page_size=3) as hub:
        yield hub


@pytest.fixture(params=["file", "http", "s3", "gcs", "azure", "mlflow", "hf", "oci"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Backend:
    if request.param == "file":
        return Backend(
            "file", lambda p, f: _write(tmp_path, p, f), lambda rest: f"file://{tmp_path}/{rest}"
        )
    if request.param == "http":
        root, base = request.getfixturevalue("http_root")
        return Backend("http", lambda p, f: _write(root, p, f), lambda rest: f"{base}/{rest}")
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3")
        client = s3.client()

        def put_s3(prefix: str, files: dict[str, bytes]) -> None:
            for rel, data in files.items():
                client.pipe_file(f"{s3.bucket}/{prefix}/{rel}", data)

        return Backend("s3", put_s3, lambda rest: f"s3://{s3.bucket}/{rest}", md5=True)
    if request.param == "azure":
        container = request.getfixturevalue("azure").container()

        def put_azure(prefix: str, files: dict[str, bytes]) -> None:
            for rel, data in files.items():
                container.upload_blob(f"{prefix}/{rel}", data, overwrite=True)

        return Backend(
            "azure", put_azure, lambda rest: f"az://{container.container_name}/{rest}", md5=True
        )
    if request.param == "oci":
        registry: Registry = request.getfixturevalue("oci_registry")
        return Backend(
            "oci",
            lambda p, f: registry.push(f"{p}:v1", f),
            lambda rest: f"oci://{registry.host}/{rest.partition('/')[0]}:v1",
            repository=True,
        )
    if request.param == "hf":
        hub: FakeHub = request.getfixturevalue("hf_hub")
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "none"))
        return Backend(
            "hf",
            lambda p, f: hub.commit(f"conformance/{p}", f),
            lambda rest: f"hf://conformance/{rest.partition('/')[0]}",
            repository=True,
        )
    if request.param == "mlflow":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        return Backend("mlflow", *conformance_parts(server))
    gcs = request.getfixturevalue("gcs")
    request.getfixturevalue("gcs_server")

    def put_gcs(prefix: str, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            gcs.pipe_file(f"{GCS_BUCKET}/{prefix}/{rel}", data)

    return Backend("gcs", put_gcs, lambda rest: f"gs://{GCS_BUCKET}/{rest}", md5=True)


def _open(uri: str) -> Source:
    return open_source(uri, chunk_size=64 * 1024, timeout=10)


def _read(source: Source, remote: RemoteFile, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray()

    def sink(offset: int, data: memoryview) -> None:
        assert offset == start + len(out), "bytes arrive in order, at the offset they belong"
        out.extend(data)

    reached = source.read_range(remote, start, end, sink)
    assert reached == start + len(out)
    return bytes(out)


def _prefix() -> str:
    return f"conf-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _stocked(backend: Backend, path: str = "") -> Iterator[Source]:
    """FILES put under a fresh prefix, and the source of ``prefix/path`` (the folder by
    default) open over them; closed afterwards."""
    prefix = _prefix()
    backend.put(prefix, FILES)
    source = _open(backend.uri(f"{prefix}/{path}"))
    try:
        yield source
    finally:
        source.close()


def test_a_folder_lists_every_file_once_sorted_with_sizes(backend: Backend) -> None:
    with _stocked(backend) as source:
        listing = source.list_files()

    assert [f.path for f in listing] == sorted(FILES)
    assert {f.path: f.size for f in listing} == {p: len(d) for p, d in FILES.items()}


def test_a_single_object_is_listed_under_its_own_name(backend: Backend) -> None:
    if backend.repository:
        pytest.skip(f"{backend.name} URIs name a whole repository, not one object in it")
    with _stocked(backend, "weights/model-00001.safetensors") as source:
        [remote] = source.list_files()
        data = _read(source, remote)

    assert (remote.path, remote.size) == ("model-00001.safetensors", 300_001)
    assert data == FILES["weights/model-00001.safetensors"]


def test_every_file_reads_back_byte_for_byte(backend: Backend) -> None:
    with _stocked(backend) as source:
        got = {f.path: _read(source, f) for f in source.list_files()}

    assert got == FILES


def test_ranged_reads_deliver_exactly_the_range(backend: Backend) -> None:
    data = FILES["weights/model-00001.safetensors"]
    with _stocked(backend) as source:
        remote = next(f for f in source.list_files() if f.path.endswith("00001.safetensors"))
        assert remote.ranges
        head = _read(source, remote, 0, 1000)
        middle = _read(source, remote, 100_000, 200_003)
        tail = _read(source, remote, 299_000)

    assert head == data[:1000]
    assert middle == data[100_000:200_003]
    assert tail == data[299_000:]


def test_not_found_is_permanent(backend: Backend) -> None:
    uri = backend.uri(f"{_prefix()}/nothing-here.bin")
    with pytest.raises(Exception) as info:
        source = _open(uri)
        try:
            source.list_files()
        finally:
            source.close()

    error = translate_error(info.value, uri)
    assert isinstance(error, CacheError)
    assert getattr(error, "permanent", False), error


def test_checksums_are_published_where_the_source_has_them(backend: Backend) -> None:
    with _stocked(backend) as source:
        listing = source.list_files()

    for remote in listing:
        expected = hashlib.md5(FILES[remote.path]).hexdigest() if backend.md5 else None
        assert remote.md5 == expected, remote.path
