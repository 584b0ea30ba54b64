"""``models:/`` against a real MLflow tracking server (artifact proxy, basic auth).

The registry holds ``mlp``: version 1 from a ``runs:/`` source, version 2 straight from an
``mlflow-artifacts:`` location, the alias ``champion`` on version 2, and (with SeaweedFS)
a version whose artifacts live in S3. Each is fetched, its bytes compared, and the ONNX
model answers an inference through an agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from mlflow_server import PASSWORD, MlflowServer
from object_stores import S3Server
from support import Agent, declaration

from nodecache.cache import MANIFEST_NAME, ModelStore
from nodecache.cache.errors import FetchError, InvalidSourceError
from nodecache.cache.sources import RemoteFile, Source, open_source
from nodecache.cache.sources.mlflow import MlflowSource
from nodecache.serve.examples import write_mlp_onnx


@dataclass
class Registry:
    server: MlflowServer
    v1: bytes
    """model.onnx of version 1 (runs:/ source)."""
    v2: bytes
    """model.onnx of version 2 (mlflow-artifacts: source), where ``champion`` points."""
    extra: dict[str, bytes]
    """Files next to model.onnx in version 2."""


@pytest.fixture(scope="module")
def registry(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    folder = tmp_path_factory.mktemp("mlflow-models")
    v1 = write_mlp_onnx(folder / "v1.onnx", seed=1).read_bytes()
    v2 = write_mlp_onnx(folder / "v2.onnx", seed=2).read_bytes()
    extra = {"MLmodel": b"flavors: {}\n", "sub dir/notes+1.txt": b"x" * 70_001}
    run1 = mlflow_server.log_run({"model.onnx": v1}, under="model")
    assert mlflow_server.register("mlp", f"runs:/{run1}/model", run1) == "1"
    run2 = mlflow_server.log_run({"model.onnx": v2, **extra}, under="model")
    location = f"mlflow-artifacts:/0/{run2}/artifacts/model"
    assert mlflow_server.register("mlp", location, run2) == "2"
    mlflow_server.alias("mlp", "champion", "2")
    return Registry(mlflow_server, v1, v2, extra)


def _open(uri: str, credentials: dict[str, str]) -> Source:
    return open_source(uri, chunk_size=64 * 1024, timeout=10, credentials=credentials)


def _read(source: Source, remote: RemoteFile, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray()
    source.read_range(remote, start, end, lambda offset, data: out.extend(data))
    return bytes(out)


@pytest.fixture
def opened(registry: Registry) -> Iterator[list[Source]]:
    """Sources a test opened, closed after it."""
    sources: list[Source] = []
    yield sources
    for source in sources:
        source.close()


def _fetch(uri: str, creds: dict[str, str], opened: list[Source]) -> tuple[Source, dict]:
    source = _open(uri, creds)
    opened.append(source)
    return source, {f.path: _read(source, f) for f in source.list_files()}


def test_a_version_from_a_runs_source_reads_back_byte_for_byte(
    registry: Registry, opened: list[Source]
) -> None:
    source, got = _fetch("models:/mlp/1", registry.server.env(), opened)

    assert got == {"model.onnx": registry.v1}
    assert isinstance(source, MlflowSource) and source.version == "1"
    assert source.location and source.location.startswith("mlflow-artifacts:/0/")
    assert "sha256 recorded" in source.verified_by
    assert source.resolved and source.resolved.startswith("version 1, checked by size")


def test_an_alias_resolves_to_its_version_once(registry: Registry, opened: list[Source]) -> None:
    server = registry.server
    source, got = _fetch("models:/mlp@champion", server.env(), opened)
    assert got == {"model.onnx": registry.v2, **registry.extra}
    assert isinstance(source, MlflowSource) and source.version == "2"

    server.alias("mlp", "champion", "1")
    try:
        # The open source keeps the version it resolved; a new one sees the move.
        assert {f.path for f in source.list_files()} == {"model.onnx", *registry.extra}
        assert source.version == "2"
        moved, got = _fetch("models:/mlp@champion", server.env(), opened)
        assert got == {"model.onnx": registry.v1}
        assert isinstance(moved, MlflowSource) and moved.version == "1"
    finally:
        server.alias("mlp", "champion", "2")


def test_listing_is_recursive_with_sizes_and_reads_are_ranged(
    registry: Registry, opened: list[Source]
) -> None:
    source = _open("models:/mlp/2", registry.server.env())
    opened.append(source)
    listing = source.list_files()

    assert [f.path for f in listing] == sorted(["model.onnx", *registry.extra])
    notes = next(f for f in listing if f.path == "sub dir/notes+1.txt")
    assert notes.size == 70_001 and notes.ranges
    model = next(f for f in listing if f.path == "model.onnx")
    assert _read(source, model, 100, 1100) == registry.v2[100:1100]
    assert _read(source, model, len(registry.v2) - 10) == registry.v2[-10:]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/no-such-model/1", "RESOURCE_DOES_NOT_EXIST"),
        ("models:/mlp/99", "RESOURCE_DOES_NOT_EXIST"),
        ("models:/mlp@no-such-alias", "alias"),
        ("models:/no-such-model@champion", "no-such-model"),
    ],
)
def test_unknown_names_versions_and_aliases_are_permanent_errors(
    registry: Registry, opened: list[Source], uri: str, expected: str
) -> None:
    with pytest.raises(FetchError) as info:
        _fetch(uri, registry.server.env(), opened)

    assert info.value.permanent, info.value
    assert expected in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    "creds",
    [
        {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong-pw-4321"},
        {"MLFLOW_TRACKING_TOKEN": "tok-secret-9876"},
        {},
    ],
    ids=["wrong-password", "bearer-token", "none"],
)
def test_wrong_or_missing_credentials_are_refused_without_the_secret(
    registry: Registry, opened: list[Source], creds: dict[str, str]
) -> None:
    env = {"MLFLOW_TRACKING_URI": registry.server.url, **creds}
    with pytest.raises(FetchError) as info:
        _fetch("models:/mlp/1", env, opened)

    message = str(info.value)
    assert info.value.permanent and "401" in message, message
    assert "MLFLOW_TRACKING" in message  # says what to check
    for secret in ("wrong-pw-4321", "tok-secret-9876", "admin"):
        assert secret not in message


def test_a_tracking_uri_is_required_and_must_be_a_server(registry: Registry) -> None:
    with pytest.raises(InvalidSourceError, match="MLFLOW_TRACKING_URI"):
        MlflowSource("models:/mlp/1", chunk_size=1024, timeout=5, credentials={})
    with pytest.raises(InvalidSourceError, match="http"):
        _open("models:/mlp/1", {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    with pytest.raises(InvalidSourceError) as info:
        _open("models:/mlp/1", {"MLFLOW_TRACKING_URI": "http://u:hunter2@127.0.0.1:1"})
    assert "hunter2" not in str(info.value)


def test_a_version_in_s3_is_fetched_through_the_s3_source(
    registry: Registry, opened: list[Source], s3: S3Server, tmp_path: Path
) -> None:
    client = s3.client()
    client.pipe_file(f"{s3.bucket}/mlflow-s3/model.onnx", registry.v1)
    version = registry.server.register("mlp-s3", f"s3://{s3.bucket}/mlflow-s3")
    creds = {**registry.server.env(), **s3.env()}

    source, got = _fetch(f"models:/mlp-s3/{version}", creds, opened)

    assert got == {"model.onnx": registry.v1}
    assert isinstance(source, MlflowSource) and source.inner is not None
    # Status names the check the fetcher applied: the S3 object's own, as the manifest
    # records it (botocore's uploads store a CRC32: checked by it, no MD5 or sha256).
    uri = f"models:/mlp-s3/{version}"
    model = asyncio.run(ModelStore(tmp_path / "cache").fetch(uri, credentials=creds))
    (entry,) = json.loads((model.path / MANIFEST_NAME).read_text())["files"]
    check = entry["checksum"].partition(":")[0]
    assert check == "crc32" and "sha256" not in entry
    assert source.verified_by == "crc32 published by the artifact store (s3)"
    assert model.resolved == f"version {version}, checked by {source.verified_by}"


def test_a_file_location_is_refused(registry: Registry, opened: list[Source]) -> None:
    # The server refuses file:// sources outside a run (HTTP 400), so no real version has
    # one; a hostile server could still answer with one: it names its disk, not this node's.
    source = _open("models:/mlp/1", registry.server.env())
    opened.append(source)
    assert isinstance(source, MlflowSource)
    source.version, source.location = "1", "file:///etc"
    with pytest.raises(FetchError, match="cannot read") as info:
        source.list_files()
    assert info.value.permanent


def _infer(agent: Agent, name: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    code, answer = agent.request("POST", f"/v2/models/{name}/infer", body)
    assert code == 200, answer
    return np.array(answer["outputs"][0]["data"], np.float32).reshape(x.shape[0], -1)


def test_an_agent_serves_a_version_and_an_alias(
    registry: Registry, agent: Agent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in registry.server.env().items():
        monkeypatch.setenv(key, value)  # the agent inherits them
    agent.start()
    agent.declare("one.yaml", declaration("mlp-one", "models:/mlp/1"))
    agent.declare("champion.yaml", declaration("mlp-champion", "models:/mlp@champion"))
    assert agent.wait_state("mlp-one", "Warm")["resolved"].startswith("version 1, checked by")
    champion = agent.wait_state("mlp-champion", "Warm")
    assert champion["resolved"].startswith("version 2, checked by size; sha256 recorded")

    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    for name, data in (("mlp-one", registry.v1), ("mlp-champion", registry.v2)):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        expected = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
        np.testing.assert_allclose(_infer(agent, name, x), expected, rtol=1e-5)

    stored = [p for p in (agent.cache_dir / "models").rglob("model.onnx")]
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in stored}
    assert digests == {hashlib.sha256(d).hexdigest() for d in (registry.v1, registry.v2)}
