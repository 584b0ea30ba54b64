"""A namespaced cache's source is isolated: it reads only the settings its own Secret and
parameters give, never the agent's environment, files or cloud identity, so a tenant that
names its own endpoint never receives the platform's credentials (review finding C1).

Real servers on loopback: a recording HTTP server as a tenant's Hugging Face or MLflow
endpoint, SeaweedFS for S3 (credentials enforced), Azurite, docker configs and a credential
helper on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from azurite import ACCOUNT, CONTAINER, AzuriteServer
from hfhub import FakeHub
from kubefake.fixtures import fake_api  # noqa: F401 (fixture)
from kubefake.harness import ClusterAgent
from kubefake.server import FakeApiServer
from kubernetes import client
from object_stores import ACCESS_KEY, SECRET_KEY, S3Server
from support import wait_for

from nodecache.cache import ModelStore
from nodecache.cache.errors import FetchError
from nodecache.cache.layout import scoped
from nodecache.cache.retry import ensure_fetch_error
from nodecache.cache.sources import ociauth, open_source
from nodecache.cache.sources.base import IsolatedSettings

PLATFORM_TOKEN = "hf_PLATFORM_SECRET_TOKEN"
G, V = "nodecache.io", "v1alpha1"


class Recorder:
    """A tenant's server: answers 404 to everything, remembers each Authorization."""

    def __init__(self) -> None:
        seen: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization"))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args: Any) -> None:
                return

        self.seen = seen
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tenant_server() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def _list(uri: str, credentials: dict[str, str], *, isolated: bool = False) -> None:
    """List ``uri`` as a fetch would open it; raise its FetchError (``open_source`` raises
    its own; a mistake in the call itself is not turned into one)."""
    source = open_source(
        uri, chunk_size=64 * 1024, timeout=10, credentials=credentials, isolated=isolated
    )
    try:
        source.list_files()
    except Exception as exc:
        raise ensure_fetch_error(exc, uri) from None
    finally:
        source.close()


def _check(store: ModelStore, uri: str, credentials: dict[str, str], isolated: bool) -> str:
    """The error of listing ``uri`` (every test source here refuses)."""
    with pytest.raises(FetchError) as info:
        _list(uri, credentials, isolated=isolated)
    return str(info.value)


@pytest.mark.parametrize("where", ["environment", "token file"])
def test_the_platforms_hf_token_never_reaches_a_tenants_endpoint(
    where: str, tenant_server: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's probe: HF_ENDPOINT from the tenant, the token from the agent."""
    from huggingface_hub import constants

    token_file = tmp_path / "hf-token"  # where `hf auth login` wrote it
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    if where == "environment":
        monkeypatch.setenv("HF_TOKEN", PLATFORM_TOKEN)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        token_file.write_text(PLATFORM_TOKEN)
    store = ModelStore(tmp_path / "cache")
    tenant = {"HF_ENDPOINT": tenant_server.url}

    _check(store, "hf://platform/private-model", tenant, isolated=True)
    with pytest.raises(FetchError):
        asyncio.run(store.fetch("hf://platform/other-model", credentials=tenant, isolated=True))
    assert tenant_server.seen and set(tenant_server.seen) == {None}, "sent no Authorization"

    # A cluster cache is the platform's own: its environment still counts there.
    _check(store, "hf://platform/private-model", tenant, isolated=False)
    assert f"Bearer {PLATFORM_TOKEN}" in tenant_server.seen
    # And a tenant's own token goes to its own endpoint.
    tenant_server.seen.clear()
    _check(store, "hf://x/y", {**tenant, "HF_TOKEN": "hf_tenant"}, isolated=True)
    assert set(tenant_server.seen) == {"Bearer hf_tenant"}


def test_the_platforms_mlflow_login_never_reaches_a_tenants_tracking_server(
    tenant_server: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "platform-mlflow-token")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "platform")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "platform-password")
    store = ModelStore(tmp_path / "cache")
    tenant = {"MLFLOW_TRACKING_URI": tenant_server.url}
    _check(store, "models:/fraud/1", tenant, isolated=True)
    assert tenant_server.seen and set(tenant_server.seen) == {None}
    _check(store, "models:/fraud/1", tenant, isolated=False)
    assert "Bearer platform-mlflow-token" in tenant_server.seen


def test_an_isolated_s3_source_without_keys_is_anonymous_not_the_agents(
    s3: S3Server, mlp_dir: Path, tmp_path: Path
) -> None:
    """The agent's environment holds working S3 keys (``s3`` puts them there); a source
    isolated with only the endpoint is refused by the store, with its own keys it reads."""
    s3.client().put(str(mlp_dir / "model.onnx"), f"{s3.bucket}/isolated-mlp/model.onnx")
    uri = f"s3://{s3.bucket}/isolated-mlp/"
    store = ModelStore(tmp_path / "cache")
    where = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    error = _check(store, uri, where, isolated=True)
    assert "AccessDenied" in error or "403" in error, error
    with pytest.raises(FetchError, match=r"AccessDenied|403"):
        asyncio.run(store.fetch(uri, credentials=where, isolated=True))
    assert store.lookup(uri) is None

    _list(uri, where, isolated=False)
    own = {**where, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    model = asyncio.run(store.fetch(uri, credentials=own, isolated=True))
    assert (model.path / "model.onnx").read_bytes() == (mlp_dir / "model.onnx").read_bytes()


def test_an_agent_fetches_a_namespaced_cache_without_its_own_credentials(
    fake_api: FakeApiServer,  # noqa: F811
    s3: S3Server,
    mlp_dir: Path,
    tmp_path: Path,
) -> None:
    """The agent's environment can read the bucket. Its cluster cache is Warm; a namespaced
    cache with no Secret, for its own URI or for the one the node already holds, is an
    error (access denied), never the agent's keys."""
    store = s3.client()
    for folder in ("platform-mlp", "team-mlp"):
        store.put(str(mlp_dir / "model.onnx"), f"{s3.bucket}/{folder}/model.onnx")
    uri, team_uri = (f"s3://{s3.bucket}/{f}/" for f in ("platform-mlp", "team-mlp"))
    crs = client.CustomObjectsApi(client.ApiClient(fake_api.configuration()))
    spec = {"sourceModelUri": uri, "modelSize": "1Mi", "nodeGroups": ["default"]}
    crs.create_cluster_custom_object(
        G, V, "localmodelcaches",
        {"apiVersion": f"{G}/{V}", "kind": "LocalModelCache", "metadata": {"name": "mlp"},
         "spec": spec},
    )  # fmt: skip
    for namespace, source in (("team-a", team_uri), ("team-b", uri)):
        crs.create_namespaced_custom_object(
            G, V, namespace, "localmodelnamespacecaches",
            {"apiVersion": f"{G}/{V}", "kind": "LocalModelNamespaceCache",
             "metadata": {"name": "mlp", "namespace": namespace},
             "spec": {**spec, "sourceModelUri": source,
                      "storage": {"parameters": {"AWS_ENDPOINT_URL": s3.endpoint}}}},
        )  # fmt: skip
    crs.create_cluster_custom_object(
        G, V, "localmodelnodes",
        {"metadata": {"name": "node-a"}, "spec": {"localModels": [
            {"modelName": "mlp", "sourceModelUri": uri},
            {"modelName": "team-a/mlp", "sourceModelUri": team_uri},
            {"modelName": "team-b/mlp", "sourceModelUri": uri},
        ]}},
    )  # fmt: skip
    agent = ClusterAgent(fake_api, tmp_path / "node-a", "node-a").start()
    try:

        def models() -> dict[str, Any]:
            status = crs.get_cluster_custom_object(G, V, "localmodelnodes", "node-a")
            return (status.get("status") or {}).get("modelStatus") or {}

        wait_for(lambda: models().get("mlp", {}).get("state") == "Warm", what="mlp Warm")
        for key in ("team-a/mlp", "team-b/mlp"):
            wait_for(lambda k=key: models().get(k, {}).get("state") == "Error", what=key)
            assert "AccessDenied" in models()[key]["error"], models()[key]
    finally:
        agent.stop()


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "AWS_CA_BUNDLE",
        "REGISTRY_AUTH_FILE",
        "DOCKER_CONFIG",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "HF_HUB_CA_BUNDLE",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
    ],
)
def test_a_key_naming_a_node_file_is_refused_for_a_namespaced_cache(
    name: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """The agent runs as root: a tenant naming a file would make it read the node's."""
    node_file = tmp_path / "credentials"
    node_file.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    store = ModelStore(tmp_path / "cache")
    settings = {name: str(node_file), "AWS_ENDPOINT_URL": s3_server.endpoint}
    uri = f"s3://{s3_server.bucket}/anything/"
    with pytest.raises(FetchError, match=f"{name} names a file on the node") as info:
        _list(uri, settings, isolated=True)
    assert info.value.permanent and SECRET_KEY not in str(info.value)
    with pytest.raises(FetchError, match=f"{name} names a file on the node"):
        asyncio.run(store.fetch(uri, credentials=settings, isolated=True))


def test_a_cluster_cache_may_still_name_a_credentials_file(
    s3_server: S3Server, mlp_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in s3_server.env():
        monkeypatch.delenv(variable, raising=False)
    s3_server.client().put(str(mlp_dir / "model.onnx"), f"{s3_server.bucket}/file-mlp/m.onnx")
    node_file = tmp_path / "credentials"
    node_file.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    settings = {
        "AWS_SHARED_CREDENTIALS_FILE": str(node_file),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    _list(f"s3://{s3_server.bucket}/file-mlp/", settings)


def _write_config(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_isolated_registry_login_never_comes_from_the_agents_docker_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = "127.0.0.1:5999"
    login = {"auths": {registry: {"username": "platform", "password": "platform-pw"}}}
    monkeypatch.setenv("DOCKER_CONFIG", str(_write_config(tmp_path / "docker", login)))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _write_config(tmp_path / "home" / ".docker", login)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "docker" / "config.json"))

    assert ociauth.find_login(registry, {}) == ociauth.Login("platform", "platform-pw")
    assert ociauth.find_login(registry, IsolatedSettings()) is None
    own = {"auths": {registry: {"username": "team", "password": "team-pw"}}}
    isolated = IsolatedSettings({".dockerconfigjson": json.dumps(own)})
    assert ociauth.find_login(registry, isolated) == ociauth.Login("team", "team-pw")


@pytest.mark.parametrize("config", [{"credsStore": "nctest"}, {"credHelpers": {"x": "nctest"}}])
def test_a_tenants_docker_config_cannot_run_the_nodes_credential_helpers(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper (ecr-login, gcloud) would answer with the node's cloud identity."""
    ran = tmp_path / "helper-ran"
    helper = tmp_path / "bin" / "docker-credential-nctest"
    helper.parent.mkdir()
    helper.write_text(f'#!/bin/sh\ntouch {ran}\necho \'{{"Username":"u","Secret":"s"}}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    secret = {".dockerconfigjson": json.dumps(config)}
    uri = "oci://x/team/model:v1"
    with pytest.raises(FetchError, match="credHelpers or credsStore") as info:
        open_source(uri, chunk_size=65536, timeout=5, credentials=secret, isolated=True)
    assert info.value.permanent
    assert not ran.exists(), "the helper never ran"


def test_an_isolated_azure_source_without_credentials_is_anonymous(
    azure: AzuriteServer, tmp_path: Path
) -> None:
    """The agent's environment holds the account's connection string; an isolated source
    naming the account and endpoint but no key is refused, never signed with it."""
    azure.container().upload_blob("isolated/model.onnx", b"weights", overwrite=True)
    where = {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ENDPOINT": azure.endpoint}
    uri = f"az://{CONTAINER}/isolated"
    store = ModelStore(tmp_path / "cache")
    _check(store, uri, where, isolated=True)
    _list(uri, where, isolated=False)


def test_a_tenants_bytes_for_a_uri_are_never_another_scopes(tmp_path: Path) -> None:
    """A namespaced cache may point its endpoint anywhere: what it fetches for a URI is
    kept under its own scope, so neither the cluster nor another namespace gets it for
    that URI (cache hit or download in flight), and the reverse."""
    with FakeHub() as platform, FakeHub() as tenant:
        platform.commit("platform/model", {"config.json": b'{"real": true}'})
        tenant.commit("platform/model", {"config.json": b'{"EVIL": true}'})
        store = ModelStore(tmp_path / "cache")
        uri = "hf://platform/model"
        evil = asyncio.run(
            store.fetch(
                scoped(uri, "team-a"), credentials={"HF_ENDPOINT": tenant.endpoint}, isolated=True
            )
        )
        real = asyncio.run(store.fetch(uri, credentials={"HF_ENDPOINT": platform.endpoint}))
        other = asyncio.run(
            store.fetch(
                scoped(uri, "team-b"), credentials={"HF_ENDPOINT": platform.endpoint}, isolated=True
            )
        )

    assert not real.hit and (real.path / "config.json").read_bytes() == b'{"real": true}'
    assert not other.hit and (other.path / "config.json").read_bytes() == b'{"real": true}'
    assert (evil.path / "config.json").read_bytes() == b'{"EVIL": true}'
    assert len({evil.key, real.key, other.key}) == 3
    # A restart finds each under its own scope.
    again = ModelStore(tmp_path / "cache")
    assert {m.source_uri for m in again.scan()} == {
        uri,
        scoped(uri, "team-a"),
        scoped(uri, "team-b"),
    }
    assert again.lookup(uri).key == real.key  # type: ignore[union-attr]
