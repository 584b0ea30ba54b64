"""The local digest (one xxh3-128 per part) recorded at verification, ``nodecache verify``
re-checking the disk against it, and the agent's ``--verify-on-start full``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import xxhash
from support import ROOT, SMALL, Agent, declaration

from nodecache.cache import MANIFEST_NAME, CacheDirLock, FetchOptions, ModelStore
from nodecache.cache.sources.base import RemoteFile, Sink
from nodecache.cache.sources.file import LocalSource

PART = SMALL.part_size


def chunk_digests(data: bytes, chunk: int) -> list[str]:
    if chunk == 0 or len(data) <= chunk:
        return [xxhash.xxh3_128(data).hexdigest()]
    return [xxhash.xxh3_128(data[i : i + chunk]).hexdigest() for i in range(0, len(data), chunk)]


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_text())


def local_of(folder: Path) -> dict[str, dict[str, Any]]:
    return {f["path"]: f.get("local") for f in manifest(folder)["files"]}


def nodecache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def source(tmp_path: Path) -> dict[str, bytes]:
    files = {
        "big.bin": os.urandom(3 * PART + 12345),  # four parts, the last one short
        "sub/small.txt": b"hello",  # one part
        "empty": b"",
    }
    for name, data in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
    return files


async def test_each_part_has_its_xxh3_in_the_manifest(
    tmp_path: Path, source: dict[str, bytes]
) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    model = await store.fetch((tmp_path / "src").as_uri())
    local = local_of(model.path)
    assert local["big.bin"] == {
        "algorithm": "xxh3-128",
        "chunk": PART,
        "digests": chunk_digests(source["big.bin"], PART),
    }
    assert local["sub/small.txt"]["digests"] == chunk_digests(b"hello", 0)
    assert local["empty"]["digests"] == chunk_digests(b"", 0)
    # Read back as the store reads it after a restart.
    (again,) = ModelStore(tmp_path / "cache", options=SMALL).scan()
    assert {f.path: f.local for f in again.files} == {f.path: f.local for f in model.files}


async def test_parts_kept_from_a_killed_fetch_are_read_back_into_their_digest(
    tmp_path: Path, source: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    options = FetchOptions(
        chunk_size=SMALL.chunk_size, part_size=PART, concurrency=1, fsync=False, retries=0,
        journal_interval=0.01,
    )  # fmt: skip
    real = LocalSource.read_range

    def failing(
        self: LocalSource, remote: RemoteFile, start: int, end: int | None, sink: Sink
    ) -> int:
        if remote.path == "big.bin" and start >= 2 * PART:
            time.sleep(0.3)  # the journal records the parts before it
            raise ConnectionResetError("connection reset by peer")
        return real(self, remote, start, end, sink)

    monkeypatch.setattr(LocalSource, "read_range", failing)
    uri = (tmp_path / "src").as_uri()
    store = ModelStore(tmp_path / "cache", options=options)
    with pytest.raises(Exception, match="reset"):
        await store.fetch(uri)
    monkeypatch.setattr(LocalSource, "read_range", real)
    seen: list[int] = []
    model = await store.fetch(uri, progress=lambda done, _total: seen.append(done))
    assert seen[0] >= 2 * PART  # the first two parts were resumed, not fetched again
    assert local_of(model.path)["big.bin"]["digests"] == chunk_digests(source["big.bin"], PART)


async def test_verify_names_the_corrupt_file_and_byte_range(
    tmp_path: Path, source: dict[str, bytes]
) -> None:
    cache = tmp_path / "cache"
    model = await ModelStore(cache, options=SMALL).fetch((tmp_path / "src").as_uri())
    ok = nodecache("verify", "--cache-dir", str(cache))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and ": ok (3 files" in ok.stdout

    flip(model.path / "big.bin", 2 * PART + 7)  # same size: the quick check sees nothing
    claim = CacheDirLock(cache)  # an agent owns the folder: verify neither waits nor writes
    try:
        before = manifest(model.path)
        bad = nodecache("verify", model.key, "--cache-dir", str(cache))
        assert manifest(model.path) == before
    finally:
        claim.release()
    assert bad.returncode == 1, bad.stderr
    assert f"corrupt: big.bin bytes {2 * PART}-{3 * PART}" in bad.stdout
    assert (model.path / "big.bin").exists()  # reported, not removed

    by_uri = nodecache("verify", model.source_uri, "--cache-dir", str(cache))
    assert by_uri.returncode == 1 and "big.bin" in by_uri.stdout


async def test_verify_usage_errors_and_manifests_without_a_local_digest(
    tmp_path: Path, source: dict[str, bytes]
) -> None:
    cache = tmp_path / "cache"
    model = await ModelStore(cache, options=SMALL).fetch((tmp_path / "src").as_uri())
    unknown = nodecache("verify", "no-such-model", "--cache-dir", str(cache))
    assert unknown.returncode == 2 and "no such cached model: no-such-model" in unknown.stderr
    missing = nodecache("verify", "--cache-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no cache at" in missing.stderr
    assert not (tmp_path / "nowhere").exists()

    # A manifest written before local digests: it still loads, and its sha256 checks it.
    old = manifest(model.path)
    for f in old["files"]:
        del f["local"]
    (model.path / MANIFEST_NAME).write_text(json.dumps(old))
    assert ModelStore(cache, options=SMALL).lookup(model.source_uri) is not None
    assert nodecache("verify", "--cache-dir", str(cache)).returncode == 0
    flip(model.path / "big.bin", 5)
    result = nodecache("verify", "--cache-dir", str(cache))
    assert result.returncode == 1 and "corrupt: big.bin bytes 0-" in result.stdout


def test_agent_verify_on_start_full_fetches_a_corrupt_model_again(
    agent: Agent, mlp_dir: Path
) -> None:
    agent.start()
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    assert agent.stop() == 0
    (folder,) = (agent.cache_dir / "models").iterdir()
    cached = folder / "model.onnx"
    flip(cached, cached.stat().st_size // 2)
    assert cached.read_bytes() != (mlp_dir / "model.onnx").read_bytes()

    agent.start("--verify-on-start", "full")
    agent.wait_state("mlp", "Warm")
    assert cached.read_bytes() == (mlp_dir / "model.onnx").read_bytes()
    removed = [e["event"] for e in agent.events() if e["event"].startswith("removing")]
    assert removed and "corrupt: model.onnx bytes 0-" in removed[0]
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    code, answer = agent.request("POST", "/v2/models/mlp/infer", body)
    assert code == 200, answer
    expected = ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(2, 10), expected)
