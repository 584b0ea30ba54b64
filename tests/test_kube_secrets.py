"""Credentials a cache names in spec.storage, read from Secrets as the agent's
ServiceAccount may read them: its own namespace for cluster caches, a tenant's namespace
only where that tenant bound the opt-in ClusterRole."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from kubefake.fixtures import fake_api  # noqa: F401 (fixture)
from kubefake.harness import ClusterAgent
from kubefake.rbac import denied_calls
from kubefake.server import FakeApiServer
from kubernetes import client
from kubernetes import config as kube_config
from object_stores import SECRET_KEY, S3Server
from support import wait_for

from nodecache.agent.declarations import parse_object
from nodecache.agent.kube.api import Kube
from nodecache.agent.kube.secrets import CredentialsError, SecretCredentials

AGENT_NS = "nodecache-system"
G, V = "nodecache.io", "v1alpha1"


def _secret(fake: FakeApiServer, namespace: str, name: str, data: dict[str, str]) -> None:
    admin = client.CoreV1Api(client.ApiClient(fake.configuration()))
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    admin.create_namespaced_secret(
        namespace, {"metadata": {"name": name, "namespace": namespace}, "data": encoded}
    )


def _opt_in(fake: FakeApiServer, namespace: str) -> None:
    """What a tenant's admin runs: bind the agent to nodecache-agent-secrets here."""
    rbac = client.RbacAuthorizationV1Api(client.ApiClient(fake.configuration()))
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "nodecache-agent-secrets", "namespace": namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "nodecache-agent-secrets",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "nodecache-agent", "namespace": AGENT_NS}
            ],
        },
    )


def _cache(storage: dict[str, Any], namespace: str | None = None) -> Any:
    kind = "LocalModelNamespaceCache" if namespace else "LocalModelCache"
    meta: dict[str, Any] = {"name": "fraud"}
    if namespace:
        meta["namespace"] = namespace
    return parse_object(
        {
            "apiVersion": "nodecache.io/v1alpha1",
            "kind": kind,
            "metadata": meta,
            "spec": {
                "sourceModelUri": "s3://models/fraud/",
                "modelSize": "1Mi",
                "nodeGroups": ["gpu"],
                "storage": storage,
            },
        }
    )


def _resolve(fake: FakeApiServer, tmp_path: Path, decl: Any) -> dict[str, str] | None:
    config = client.Configuration()
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig", user="agent")
    kube_config.load_kube_config(str(kubeconfig), client_configuration=config)

    async def go() -> dict[str, str] | None:
        with client.ApiClient(config) as api:
            return await SecretCredentials(Kube(api), AGENT_NS)(decl)

    return asyncio.run(go())


def test_a_cluster_cache_reads_its_secret_in_the_agents_namespace(
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    _secret(
        fake_api, AGENT_NS, "s3-prod", {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "S"}
    )
    decl = _cache({"secretRef": {"name": "s3-prod"}, "parameters": {"AWS_DEFAULT_REGION": "eu"}})

    found = _resolve(fake_api, tmp_path, decl)

    assert found == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "S",
        "AWS_DEFAULT_REGION": "eu",
    }
    assert denied_calls(fake_api) == []


def test_kserve_storage_config_keys_map_to_the_sources_names(
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    entry = {
        "type": "s3",
        "access_key_id": "AK",
        "secret_access_key": "S",
        "endpoint_url": "http://minio:9000",
        "region": "us-east-2",
        "bucket": "ignored",
    }
    _secret(fake_api, AGENT_NS, "storage-config", {"localMinIO": json.dumps(entry)})
    decl = _cache({"key": "localMinIO", "parameters": {"AWS_ENDPOINT_URL": "http://other:9000"}})

    found = _resolve(fake_api, tmp_path, decl)

    assert found == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "S",
        "AWS_ENDPOINT_URL": "http://other:9000",  # parameters override, as in KServe
        "AWS_DEFAULT_REGION": "us-east-2",
    }


def test_a_namespaced_cache_never_reads_the_agents_namespace(
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A tenant naming the platform's Secret gets a Secret of its own namespace, or nothing."""
    _secret(fake_api, AGENT_NS, "s3-prod", {"AWS_SECRET_ACCESS_KEY": "platform-secret"})
    decl = _cache({"secretRef": {"name": "s3-prod"}}, namespace="team-a")

    with pytest.raises(CredentialsError) as info:
        _resolve(fake_api, tmp_path, decl)

    message = str(info.value)
    assert "team-a/s3-prod" in message and "nodecache-agent-secrets" in message
    assert "platform-secret" not in message

    # The tenant opts in, and has a Secret of that name: that one is read.
    _opt_in(fake_api, "team-a")
    _secret(fake_api, "team-a", "s3-prod", {"AWS_SECRET_ACCESS_KEY": "team-secret"})
    assert _resolve(fake_api, tmp_path, decl) == {"AWS_SECRET_ACCESS_KEY": "team-secret"}


@pytest.mark.parametrize(
    ("setup", "storage", "expected"),
    [
        (None, {"secretRef": {"name": "absent"}}, "Secret nodecache-system/absent not found"),
        ("storage-config", {"key": "nope"}, "no such key"),
        ("bad-json", {"key": "k"}, "not a JSON object"),
    ],
)
def test_missing_or_malformed_secrets_say_what_is_wrong_without_values(
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    setup: str | None,
    storage: dict[str, Any],
    expected: str,
) -> None:
    if setup == "storage-config":
        _secret(fake_api, AGENT_NS, "storage-config", {"other": '{"access_key_id": "AK-1"}'})
    elif setup == "bad-json":
        _secret(fake_api, AGENT_NS, "storage-config", {"k": "secret-value-not-json"})

    with pytest.raises(CredentialsError, match=expected) as info:
        _resolve(fake_api, tmp_path, _cache(storage))

    assert "AK-1" not in str(info.value) and "secret-value" not in str(info.value)


def test_without_a_secret_only_parameters_reach_the_source(
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    decl = _cache({"parameters": {"plainHTTP": "true"}})
    assert _resolve(fake_api, tmp_path, decl) == {"plainHTTP": "true"}
    assert not [c for c in fake_api.calls if "secrets" in c[2]], "no Secret read"


def test_a_cluster_agent_fetches_with_the_secret_its_cache_names(
    fake_api: FakeApiServer,  # noqa: F811
    s3_server: S3Server,
    mlp_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent's environment holds no S3 credentials; only the named Secret does. A
    namespaced cache naming a Secret its namespace never granted shows why in status, and one
    naming a URI the node already holds gets it only if its own credentials can read it."""
    for name in s3_server.env():
        monkeypatch.delenv(name, raising=False)
    store = s3_server.client()
    for folder in ("secret-mlp", "team-mlp"):
        store.put(str(mlp_dir / "model.onnx"), f"{s3_server.bucket}/{folder}/model.onnx")
    uri, team_uri = (f"s3://{s3_server.bucket}/{f}/" for f in ("secret-mlp", "team-mlp"))
    _secret(fake_api, AGENT_NS, "s3-creds", s3_server.env())
    _secret(fake_api, "team-a", "s3-creds", s3_server.env())
    # team-b may be read, but its key is wrong, and it names the URI the cluster cache holds.
    _opt_in(fake_api, "team-b")
    _secret(fake_api, "team-b", "s3-creds", s3_server.env(secret="not-the-key"))
    admin = client.ApiClient(fake_api.configuration())
    crs = client.CustomObjectsApi(admin)
    spec = {"sourceModelUri": uri, "modelSize": "1Mi", "nodeGroups": ["default"],
            "storage": {"secretRef": {"name": "s3-creds"}}}  # fmt: skip
    crs.create_cluster_custom_object(
        G, V, "localmodelcaches",
        {"apiVersion": f"{G}/{V}", "kind": "LocalModelCache", "metadata": {"name": "mlp"},
         "spec": spec},
    )  # fmt: skip
    crs.create_namespaced_custom_object(
        G, V, "team-a", "localmodelnamespacecaches",
        {"apiVersion": f"{G}/{V}", "kind": "LocalModelNamespaceCache",
         "metadata": {"name": "mlp", "namespace": "team-a"},
         "spec": {**spec, "sourceModelUri": team_uri}},
    )  # fmt: skip
    crs.create_namespaced_custom_object(
        G, V, "team-b", "localmodelnamespacecaches",
        {"apiVersion": f"{G}/{V}", "kind": "LocalModelNamespaceCache",
         "metadata": {"name": "mlp", "namespace": "team-b"}, "spec": spec},
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
        wait_for(lambda: "team-a/mlp" in models(), what="team-a's cache in status")
        wait_for(lambda: models()["team-a/mlp"].get("state") == "Error", what="its error")
        error = models()["team-a/mlp"]["error"]
        assert "team-a/s3-creds" in error and "nodecache-agent-secrets" in error
        # The bytes are on the node, but team-b's own credentials cannot read the source.
        wait_for(
            lambda: models().get("team-b/mlp", {}).get("state") == "Error", what="team-b refused"
        )
        assert SECRET_KEY not in str(models())
    finally:
        agent.stop()
    assert denied_calls(fake_api) == ["agent: get secrets team-a/s3-creds"], (
        "only the read the tenant never granted is refused"
    )
