"""``oci://`` against a real registry (Debian's docker-registry 2.8) with artifacts pushed by
ORAS, and against a small fake for what that registry cannot do (Bearer tokens, blobs
redirected to another origin)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from oci_registry import PASSWORD, Registry, auth_registry_fixture, registry_fixture  # noqa: F401
from support import SMALL, free_port

from nodecache.cache import MANIFEST_NAME, FetchError, IntegrityError, ModelStore
from nodecache.cache.errors import InvalidSourceError
from nodecache.cache.ociref import DOCKER_HUB, parse_oci_uri
from nodecache.cache.sources import open_source
from nodecache.cache.sources.oci import MODELPACK_ARTIFACT, OciSource
from nodecache.cache.uri import validate_source_uri

FILES = {
    "model.onnx": os.urandom(5000),
    "weights/shard-0.safetensors": os.urandom(700_001),
    "tokenizer/vocab.txt": b"hello\nworld\n",
}
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"


def read_model(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _repo(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


# -- references ---------------------------------------------------------------------------


def test_references_parse_as_the_distribution_spec_writes_them() -> None:
    digest = "sha256:" + "a" * 64
    ref = parse_oci_uri(f"oci://127.0.0.1:5000/team/mlp:v1@{digest}")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "127.0.0.1:5000",
        "team/mlp",
        "v1",
        digest,
    )
    assert ref.reference == digest  # the digest wins over the tag
    hub = parse_oci_uri("oci://kserve/sklearnserver:v0.14")
    assert (hub.registry, hub.repository) == (DOCKER_HUB, "kserve/sklearnserver")
    assert parse_oci_uri("oci://ubuntu:24.04").repository == "library/ubuntu"
    assert parse_oci_uri("oci://docker.io/ubuntu:24.04").registry == DOCKER_HUB
    assert validate_source_uri("OCI://Localhost:5000/m:v1") == "oci://localhost:5000/m:v1"


@pytest.mark.parametrize(
    "uri",
    [
        "oci://localhost:5000/team/mlp",  # no tag: an implicit latest moves under a model
        "oci://localhost:5000/Team/mlp:v1",
        "oci://localhost:5000/team/mlp:v1@sha256:abc",
        "oci://localhost:5000/team/mlp:bad/tag",
        "oci://localhost:5000/:v1",
        "oci://localhost:99999/m:v1",
        "oci://localhost:5000/team//mlp:v1",
        "oci://localhost:5000/m:v1?x=1",
    ],
)
def test_bad_references_are_refused_up_front(uri: str) -> None:
    with pytest.raises(InvalidSourceError):
        validate_source_uri(uri)


def test_plain_http_only_for_loopback_unless_asked() -> None:
    remote = OciSource("oci://registry.example.com:5000/m:v1", chunk_size=1024, timeout=5)
    local = OciSource("oci://127.0.0.1:5000/m:v1", chunk_size=1024, timeout=5)
    asked = OciSource(
        "oci://registry.example.com/m:v1",
        chunk_size=1024,
        timeout=5,
        credentials={"plainHTTP": "true"},
    )
    assert remote.base.startswith("https://registry.example.com:5000/v2/m")
    assert local.base.startswith("http://127.0.0.1:5000/")
    assert asked.base.startswith("http://registry.example.com/")


# -- a real registry ----------------------------------------------------------------------


async def test_an_oras_artifact_is_fetched_byte_for_byte_by_tag(
    tmp_path: Path, oci_registry: Registry
) -> None:
    repo = _repo("oras")
    oci_registry.push(f"{repo}:v1", FILES)
    _, digest = oci_registry.manifest(repo, "v1")
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert read_model(model.path) == FILES
    assert model.resolved == digest  # what status shows
    assert {f.path: f.sha256 for f in model.files} == {
        p: hashlib.sha256(d).hexdigest() for p, d in FILES.items()
    }


async def test_a_digest_reference_fetches_that_manifest(
    tmp_path: Path, oci_registry: Registry
) -> None:
    repo = _repo("bydigest")
    oci_registry.push(f"{repo}:v1", FILES)
    _, digest = oci_registry.manifest(repo, "v1")
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}@{digest}")

    assert read_model(model.path) == FILES


def test_a_tag_resolves_once_and_a_moved_tag_changes_nothing_read(
    oci_registry: Registry,
) -> None:
    repo = _repo("moving")
    oci_registry.push(f"{repo}:v1", {"model.onnx": b"first"})
    source = open_source(f"oci://{oci_registry.host}/{repo}:v1", chunk_size=65536, timeout=10)
    try:
        [remote] = source.list_files()
        oci_registry.push(f"{repo}:v1", {"model.onnx": b"second, longer"})
        out = bytearray()
        source.read_range(remote, 0, remote.size, lambda _o, d: out.extend(d))
    finally:
        source.close()

    assert bytes(out) == b"first"


async def test_a_modelpack_is_fetched_by_its_filepath_annotations(
    tmp_path: Path, oci_registry: Registry
) -> None:
    repo = _repo("modelpack")
    oci_registry.push(
        f"{repo}:build",
        FILES,
        annotation="org.cncf.model.filepath",
        media_type=WEIGHT_RAW,
        config_media_type=MODEL_CONFIG,
    )
    manifest, _ = oci_registry.manifest(repo, "build")
    for layer in manifest["layers"]:  # modctl names files by filepath only
        del layer["annotations"]["org.opencontainers.image.title"]
    manifest["artifactType"] = MODELPACK_ARTIFACT
    oci_registry.put_manifest(repo, "v1", manifest)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert read_model(model.path) == FILES


async def test_a_modelpack_of_tar_layers_is_unpacked(
    tmp_path: Path, oci_registry: Registry
) -> None:
    # modctl build's default: each layer a tar of paths relative to the model folder.
    repo = _repo("modelpack-tar")
    layers = []
    for kind, (rel, data) in zip(("weight", "weight", "doc"), FILES.items(), strict=True):
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        media = f"application/vnd.cncf.model.{kind}.v1.tar"
        layers.append((archive.getvalue(), media, rel))
    config = b'{"descriptor": {"name": "mlp"}}'
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": MODELPACK_ARTIFACT,
        "config": {
            "mediaType": MODEL_CONFIG,
            "digest": oci_registry.push_blob(repo, config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": media,
                "digest": oci_registry.push_blob(repo, data),
                "size": len(data),
                "annotations": {"org.cncf.model.filepath": rel},
            }
            for data, media, rel in layers
        ],
    }
    oci_registry.put_manifest(repo, "v1", manifest)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert read_model(model.path) == FILES
    assert {f.path: f.sha256 for f in model.files} == {
        p: hashlib.sha256(d).hexdigest() for p, d in FILES.items()
    }

    # One raw file among the archives: refused before any byte, saying what to do.
    manifest["layers"][0]["mediaType"] = WEIGHT_RAW
    oci_registry.put_manifest(repo, "mixed", manifest)
    with pytest.raises(FetchError, match="modctl --raw") as info:
        await ModelStore(tmp_path / "other", options=SMALL).fetch(
            f"oci://{oci_registry.host}/{repo}:mixed"
        )
    assert info.value.permanent


async def test_a_corrupted_blob_is_an_integrity_error_and_nothing_is_served(
    tmp_path: Path, oci_registry: Registry
) -> None:
    repo = _repo("corrupt")
    data = os.urandom(600_000)
    oci_registry.push(f"{repo}:v1", {"model.onnx": data})
    manifest, _ = oci_registry.manifest(repo, "v1")
    blob = oci_registry.blob_file(manifest["layers"][0]["digest"])
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match="sha256"):
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.mark.parametrize("what", ["tag", "repository", "digest"])
async def test_unknown_tags_repositories_and_digests_are_permanent(
    tmp_path: Path, oci_registry: Registry, what: str
) -> None:
    repo = _repo("known")
    oci_registry.push(f"{repo}:v1", {"model.onnx": b"x"})
    uri = {
        "tag": f"oci://{oci_registry.host}/{repo}:v9",
        "repository": f"oci://{oci_registry.host}/{repo}-nope:v1",
        "digest": f"oci://{oci_registry.host}/{repo}@sha256:{'0' * 64}",
    }[what]
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(uri)

    assert info.value.permanent
    assert "not found" in str(info.value) and repo in str(info.value)


# -- credentials --------------------------------------------------------------------------


async def test_basic_auth_from_a_docker_config(
    tmp_path: Path, oci_registry_auth: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo("private")
    oci_registry_auth.push(f"{repo}:v1", FILES)
    assert oci_registry_auth.config is not None
    uri = f"oci://{oci_registry_auth.host}/{repo}:v1"

    store = ModelStore(tmp_path / "secret", options=SMALL)
    by_secret = await store.fetch(
        uri, credentials={".dockerconfigjson": oci_registry_auth.config.read_text()}
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_bytes(oci_registry_auth.config.read_bytes())
    by_env = await ModelStore(tmp_path / "env", options=SMALL).fetch(uri)

    assert read_model(by_secret.path) == read_model(by_env.path) == FILES


async def test_missing_and_wrong_credentials_are_clear_and_show_no_secret(
    tmp_path: Path, oci_registry_auth: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo("locked")
    oci_registry_auth.push(f"{repo}:v1", {"model.onnx": b"x"})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    uri = f"oci://{oci_registry_auth.host}/{repo}:v1"
    wrong = "not-the-" + PASSWORD
    config = {
        "auths": {
            f"https://{oci_registry_auth.host}/v1/": {
                "auth": base64.b64encode(f"puller:{wrong}".encode()).decode()
            }
        }
    }
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as missing:
        await store.fetch(uri)
    with pytest.raises(FetchError) as refused:
        await store.fetch(uri, credentials={".dockerconfigjson": json.dumps(config)})

    assert missing.value.permanent and "no docker config has a login" in str(missing.value)
    assert refused.value.permanent and "refused the login" in str(refused.value)
    assert wrong not in str(refused.value) and PASSWORD not in str(refused.value)


# -- what the Debian registry cannot do: a fake with Bearer tokens and a CDN ----------------


class _FakeRegistry:
    """A registry with Bearer token auth whose blobs redirect to a CDN on another port; the
    CDN records the ``Authorization`` headers it was sent. Tokens last ``token_life`` and
    the registry honours only the newest one."""

    def __init__(self, blob: bytes, token_life: int = 3600) -> None:
        self.blob = blob
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.token_life = token_life
        self.tokens = 0
        self.cdn_auth: list[str | None] = []
        self.port, self.cdn_port = free_port(), free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []

    def manifest(self) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.empty.v1+json",
                    "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
                    "size": 2,
                },
                "layers": [
                    {
                        "mediaType": "application/octet-stream",
                        "digest": self.digest,
                        "size": len(self.blob),
                        "annotations": {"org.opencontainers.image.title": "model.bin"},
                    }
                ],
            }
        ).encode()

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer token-{self.tokens}"

    def _challenge(self) -> web.Response:
        realm = f"http://127.0.0.1:{self.port}/token"
        return web.Response(
            status=401,
            headers={
                "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",'
                'scope="repository:team/model:pull"'
            },
        )

    async def token(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(b"puller:pw").decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        assert request.query["scope"] == "repository:team/model:pull"
        assert request.query["service"] == "fake"
        self.tokens += 1
        return web.json_response({"token": f"token-{self.tokens}", "expires_in": self.token_life})

    async def manifests(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._challenge()
        return web.Response(
            body=self.manifest(),
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )

    async def blobs(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._challenge()
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{self.cdn_port}/store/blob")

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_auth.append(request.headers.get("Authorization"))
        start, _, end = request.headers["Range"].removeprefix("bytes=").partition("-")
        first, last = int(start), int(end) if end else len(self.blob) - 1
        return web.Response(
            status=206,
            body=self.blob[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{len(self.blob)}"},
        )

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_get("/v2/team/model/manifests/{ref}", self.manifests)
        app.router.add_get("/v2/team/model/blobs/{digest}", self.blobs)
        cdn = web.Application()
        cdn.router.add_get("/store/blob", self.cdn)
        for application, port in ((app, self.port), (cdn, self.cdn_port)):
            runner = web.AppRunner(application)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    def __enter__(self) -> _FakeRegistry:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def fake_registry() -> Iterator[_FakeRegistry]:
    with _FakeRegistry(os.urandom(300_000)) as fake:
        yield fake


def _login(port: int) -> dict[str, str]:
    auth = base64.b64encode(b"puller:pw").decode()
    return {".dockerconfigjson": json.dumps({"auths": {f"127.0.0.1:{port}": {"auth": auth}}})}


def _read_all(source: Any, remote: Any) -> bytes:
    out = bytearray()
    source.read_range(remote, 0, remote.size, lambda _o, d: out.extend(d))
    return bytes(out)


def test_bearer_tokens_and_no_authorization_across_a_redirect(
    fake_registry: _FakeRegistry,
) -> None:
    uri = f"oci://127.0.0.1:{fake_registry.port}/team/model:v1"
    source = open_source(uri, chunk_size=65536, timeout=10, credentials=_login(fake_registry.port))
    try:
        [remote] = source.list_files()
        data = _read_all(source, remote)
    finally:
        source.close()

    assert data == fake_registry.blob
    assert fake_registry.tokens == 1
    assert fake_registry.cdn_auth == [None]


def test_an_expired_token_is_renewed_mid_download(fake_registry: _FakeRegistry) -> None:
    uri = f"oci://127.0.0.1:{fake_registry.port}/team/model:v1"
    source = open_source(uri, chunk_size=65536, timeout=10, credentials=_login(fake_registry.port))
    try:
        [remote] = source.list_files()
        fake_registry.tokens += 1  # the registry forgets the token it gave
        data = _read_all(source, remote)
    finally:
        source.close()

    assert data == fake_registry.blob
    assert fake_registry.tokens == 3


async def test_a_moved_tag_never_changes_a_model_on_disk(
    tmp_path: Path, oci_registry: Registry
) -> None:
    repo = _repo("pinned")
    oci_registry.push(f"{repo}:v1", {"model.onnx": b"first"})
    store = ModelStore(tmp_path / "cache", options=SMALL)
    uri = f"oci://{oci_registry.host}/{repo}:v1"
    first = await store.fetch(uri)
    oci_registry.push(f"{repo}:v1", {"model.onnx": b"second"})

    again = await store.fetch(uri)

    assert again.hit and again.resolved == first.resolved
    assert (again.path / "model.onnx").read_bytes() == b"first"
