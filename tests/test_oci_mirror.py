"""``--registry-mirror HOST=MIRROR`` against two real registries (Debian's docker-registry
2.8): the registry the URI names, and a mirror holding a copy of its images."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_registry import OCI_TAR_GZIP, Registry, run_registry
from support import ROOT, SMALL, Agent, declaration, free_port

from nodecache.cache import FetchError, ModelStore, StoredModel
from nodecache.cache.ociref import parse_mirror

REPO = "team/model"


def image(text: bytes) -> list[tuple[bytes, str]]:
    """A one-layer modelcar whose model.onnx holds ``text``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("models/model.onnx")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return [(gzip.compress(out.getvalue(), mtime=0), OCI_TAR_GZIP)]


A, B = b"model A " * 5000, b"model B " * 5000


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Registry, Registry]]:
    """(registry, mirror), both holding image A at ``REPO:v1``."""
    with (
        run_registry(tmp_path / "upstream") as upstream,
        run_registry(tmp_path / "mirror") as mirror,
    ):
        for where in (upstream, mirror):
            where.push_image(f"{REPO}:v1", image(A))
        yield upstream, mirror


def store_with(tmp_path: Path, *mirrors: str) -> ModelStore:
    options = dataclasses.replace(SMALL, registry_mirrors=tuple(parse_mirror(m) for m in mirrors))
    return ModelStore(tmp_path / f"cache-{os.urandom(3).hex()}", options=options)


def model_bytes(model: StoredModel) -> bytes:
    return (model.path / "model.onnx").read_bytes()


def stop(registry: Registry) -> None:
    """The registry goes away; its address stays named in URIs (connections refused)."""
    assert registry.proc is not None
    registry.proc.terminate()
    registry.proc.wait(10)


async def test_a_digest_comes_from_the_mirror_when_the_registry_is_gone(
    tmp_path: Path, pair: tuple[Registry, Registry]
) -> None:
    upstream, mirror = pair
    _, digest = upstream.manifest(REPO, "v1")
    stop(upstream)
    store = store_with(tmp_path, f"{upstream.host}={mirror.host}")

    model = await store.fetch(f"oci://{upstream.host}/{REPO}@{digest}")

    assert model_bytes(model) == A and model.resolved == digest


async def test_dead_and_empty_mirrors_fall_through_to_the_registry(
    tmp_path: Path, pair: tuple[Registry, Registry]
) -> None:
    upstream, _ = pair
    with run_registry(tmp_path / "empty") as empty:
        _, digest = upstream.manifest(REPO, "v1")
        store = store_with(
            tmp_path,
            f"{upstream.host}=127.0.0.1:{free_port()}",  # refused
            f"{upstream.host}={empty.host}",  # 404 for everything
        )
        by_digest = await store.fetch(f"oci://{upstream.host}/{REPO}@{digest}")
        by_tag = await store.fetch(f"oci://{upstream.host}/{REPO}:v1")

    assert model_bytes(by_digest) == model_bytes(by_tag) == A


async def test_a_blob_the_mirror_lacks_comes_from_the_registry(
    tmp_path: Path, pair: tuple[Registry, Registry]
) -> None:
    upstream, mirror = pair
    manifest, digest = mirror.manifest(REPO, "v1")
    mirror.blob_file(manifest["layers"][0]["digest"]).unlink()  # a partial pull-through cache
    store = store_with(tmp_path, f"{upstream.host}={mirror.host}")

    model = await store.fetch(f"oci://{upstream.host}/{REPO}@{digest}")

    assert model_bytes(model) == A


async def test_a_tag_is_the_registrys_unless_it_cannot_answer(
    tmp_path: Path, pair: tuple[Registry, Registry]
) -> None:
    upstream, mirror = pair
    _, a_digest = upstream.manifest(REPO, "v1")
    b_digest = mirror.push_image(f"{REPO}:v2", image(B))
    mirror.push_image(f"{REPO}:v1", image(B))  # a stale or hostile mirror moved the tag
    store = store_with(tmp_path, f"{upstream.host}={mirror.host}")

    model = await store.fetch(f"oci://{upstream.host}/{REPO}:v1")
    assert (model_bytes(model), model.resolved) == (A, a_digest)
    # The registry answered "no such tag": final, even though the mirror has one.
    with pytest.raises(FetchError, match="no v2 in") as info:
        await store.fetch(f"oci://{upstream.host}/{REPO}:v2")
    assert info.value.permanent

    stop(upstream)  # now it cannot answer: the mirror resolves the tag, status shows it
    moved = await store_with(tmp_path, f"{upstream.host}={mirror.host}").fetch(
        f"oci://{upstream.host}/{REPO}:v2"
    )
    assert (model_bytes(moved), moved.resolved) == (B, b_digest)


def test_the_registrys_credentials_never_reach_a_mirror(tmp_path: Path) -> None:
    import asyncio

    with (
        run_registry(tmp_path / "upstream", auth=True) as upstream,
        run_registry(tmp_path / "mirror", auth=True) as mirror,  # same user and password
    ):
        for where in (upstream, mirror):
            where.push_image(f"{REPO}:v1", image(A))
        _, digest = upstream.manifest(REPO, "v1")
        assert upstream.config is not None and mirror.config is not None
        auths = json.loads(upstream.config.read_text())["auths"]
        stop(upstream)
        uri = f"oci://{upstream.host}/{REPO}@{digest}"
        spec = f"{upstream.host}={mirror.host}"

        only_upstream = {"REGISTRY_AUTH_FILE": str(upstream.config)}
        with pytest.raises(FetchError) as info:
            asyncio.run(store_with(tmp_path, spec).fetch(uri, credentials=only_upstream))
        assert "registry-pw-never-shown" not in str(info.value)

        both = tmp_path / "both.json"
        auths.update(json.loads(mirror.config.read_text())["auths"])
        both.write_text(json.dumps({"auths": auths}))
        model = asyncio.run(
            store_with(tmp_path, spec).fetch(uri, credentials={"REGISTRY_AUTH_FILE": str(both)})
        )
        assert model_bytes(model) == A


def test_an_agent_pulls_through_its_registry_mirror_flag(
    pair: tuple[Registry, Registry], agent: Agent, mlp_dir: Path
) -> None:
    upstream, mirror = pair
    onnx = (mlp_dir / "model.onnx").read_bytes()
    digest = mirror.push_image(f"{REPO}:mlp", image(onnx))  # only the mirror has it
    stop(upstream)
    agent.start("--registry-mirror", f"{upstream.host}={mirror.host}")
    agent.declare("m.yaml", declaration("m", f"oci://{upstream.host}/{REPO}@{digest}"))

    assert agent.wait_state("m", "Warm", timeout=90)["resolved"] == digest
    stored = list((agent.cache_dir / "models").rglob("model.onnx"))
    assert [p.read_bytes() for p in stored] == [onnx]


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("docker.io", "is not HOST=MIRROR"),
        ("docker.io=mirror.local/path", "no path"),
        ("docker.io=ftp://mirror.local", "only http:// or https://"),
    ],
)
def test_a_bad_registry_mirror_flag_is_a_usage_error(value: str, said: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "agent", "--registry-mirror", value],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and said in done.stderr
