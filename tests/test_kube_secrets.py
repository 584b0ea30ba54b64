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
from kubefake.rbac import denied_calls
from kubefake.server import FakeApiServer
from kubernetes import client
from kubernetes import config as kube_config

from nodecache.agent.declarations import parse_object
from nodecache.agent.kube.api import Kube
from nodecache.agent.kube.secrets import CredentialsError, SecretCredentials

AGENT_NS = "nodecache-system"


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
