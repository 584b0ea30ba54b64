"""Node labels for scheduling: the agent labels its own Node with the models it holds, and
the admission policy holds it to those labels (CEL evaluated as the apiserver would)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from kubefake.fixtures import api_client, fake_api  # noqa: F401 (fixtures)
from kubefake.harness import ClusterAgent
from kubefake.rbac import denied_calls
from kubefake.server import FakeApiServer
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from support import wait_for

from nodecache.agent.kube.labels import (
    OWN_KEY,
    desired_labels,
    is_ours,
    label_key,
    label_patch,
    with_node_labels,
)

G, V = "nodecache.io", "v1alpha1"
DAEMONSET = Path(__file__).resolve().parent.parent / "daemonset"
AGENT = "system:serviceaccount:nodecache-system:nodecache-agent"
LONG = "m" * 64  # a valid cache name (DNS subdomain), one character too many for a label key
FOREIGN = {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "z1"}


# -- the key scheme and the patch (pure) --------------------------------------


def test_label_keys_for_cluster_and_namespaced_caches() -> None:
    assert label_key("resnet50") == ("cache.nodecache.io/resnet50", None)
    assert label_key("payments/fraud-scorer") == ("payments.cache.nodecache.io/fraud-scorer", None)
    assert label_key("llama-3.1-8b") == ("cache.nodecache.io/llama-3.1-8b", None)
    assert label_key("m" * 63)[0] == "cache.nodecache.io/" + "m" * 63
    key, why = label_key(LONG)
    assert key is None and "64 characters" in why and "at most 63" in why
    assert label_key(f"{'n' * 63}/{'m' * 63}")[0] == f"{'n' * 63}.cache.nodecache.io/{'m' * 63}"
    assert label_key("Bad_NS/m")[0] is None and label_key("x/-m")[0] is None


def test_status_names_each_models_key_or_why_there_is_none() -> None:
    status = {"modelStatus": {
        "a": {"state": "Warm"}, "b": {"state": "Downloaded"}, "c": {"state": "Loading"},
        "team/d": {"state": "Warm"}, "e": {"state": "Downloading"}, "f": {"state": "Error"},
        LONG: {"state": "Warm"},
    }}  # fmt: skip
    with_node_labels(status)
    models = status["modelStatus"]
    assert models["team/d"]["nodeLabel"] == "team.cache.nodecache.io/d"
    assert models["e"] == {"state": "Downloading"} and models["f"] == {"state": "Error"}
    assert "nodeLabel" not in models[LONG] and "at most 63" in models[LONG]["nodeLabelSkipped"]
    assert desired_labels(status) == {  # held models only: not yet on disk, no label
        "cache.nodecache.io/a": "warm",
        "cache.nodecache.io/b": "disk",
        "cache.nodecache.io/c": "disk",
        "team.cache.nodecache.io/d": "warm",
    }


def test_the_patch_names_only_our_labels() -> None:
    current = {**FOREIGN, "cache.nodecache.io/old": "warm", "cache.nodecache.io/a": "disk"}
    desired = {"cache.nodecache.io/a": "warm", "team.cache.nodecache.io/b": "disk"}
    assert label_patch(current, desired) == {"metadata": {"labels": {
        "cache.nodecache.io/a": "warm",
        "team.cache.nodecache.io/b": "disk",
        "cache.nodecache.io/old": None,
    }}}  # fmt: skip
    assert label_patch({**FOREIGN, **desired}, desired) is None
    assert label_patch(FOREIGN, {"kubernetes.io/hostname": "x"}) is None  # never others'
    near_misses = ["nodecache.io/a", "evilcache.nodecache.io/a", "a.b.cache.nodecache.io/c",
                   "cache.nodecache.io.example.com/a", "cache.nodecache.io"]  # fmt: skip
    assert not any(map(is_ours, near_misses))


# -- the fake checks labels as a cluster does ---------------------------------


def test_fake_validates_labels_and_merges_them_like_the_apiserver(
    api_client: client.ApiClient,  # noqa: F811
) -> None:
    core = client.CoreV1Api(api_client)
    node = core.create_node({"metadata": {"name": "n1", "labels": FOREIGN}})
    rv = node.metadata.resource_version
    merge = "application/merge-patch+json"
    body = {"metadata": {"labels": {"cache.nodecache.io/a": "warm"}}}
    node = core.patch_node("n1", body, _content_type=merge)
    assert node.metadata.labels == {**FOREIGN, "cache.nodecache.io/a": "warm"}
    assert int(node.metadata.resource_version) > int(rv)
    body = {"metadata": {"labels": {"cache.nodecache.io/a": None}}}
    node = core.patch_node("n1", body, _content_type="application/strategic-merge-patch+json")
    assert node.metadata.labels == FOREIGN
    for key, value, message in [
        ("cache.nodecache.io/" + LONG, "warm", "name part must be no more than 63 characters"),
        ("Bad_Prefix/a", "warm", "prefix part a lowercase RFC 1123 subdomain"),
        ("a/b/c", "warm", "a qualified name must consist of"),
        ("cache.nodecache.io/a", "not ok", "a valid label must be an empty string or consist"),
    ]:
        with pytest.raises(ApiException) as caught:
            core.patch_node("n1", {"metadata": {"labels": {key: value}}}, _content_type=merge)
        assert caught.value.status == 422 and message in caught.value.body, caught.value.body
    stale = {"metadata": {"labels": {"x": "y"}, "resourceVersion": rv}}
    with pytest.raises(ApiException) as caught:
        core.patch_node("n1", stale, _content_type=merge)
    assert caught.value.status == 409


# -- the agent against the fake -------------------------------------------------


def cache_object(name: str, uri: str, kind: str = "LocalModelCache", **meta: Any) -> dict:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": kind,
        "metadata": {"name": name, **meta},
        "spec": {"sourceModelUri": uri, "modelSize": "1Mi", "nodeGroups": ["default"]},
    }


@pytest.fixture
def crs(api_client: client.ApiClient) -> client.CustomObjectsApi:  # noqa: F811
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def node_a(
    fake_api: FakeApiServer,  # noqa: F811
    api_client: client.ApiClient,  # noqa: F811
    tmp_path: Path,
) -> Iterator[ClusterAgent]:
    """An agent on node-a, whose Node has others' labels and one of ours from a past run."""
    stale = {"cache.nodecache.io/gone-before-restart": "warm"}
    client.CoreV1Api(api_client).create_node(
        {"metadata": {"name": "node-a", "labels": {**FOREIGN, **stale}}}
    )
    agent = ClusterAgent(fake_api, tmp_path / "node-a", "node-a").start()
    yield agent
    agent.stop()
    assert fake_api.pruned == [], "the agent wrote fields the CRD schema does not have"
    assert denied_calls(fake_api) == [], "the agent's RBAC would refuse these"


def node_labels(api_client: client.ApiClient) -> dict[str, str]:  # noqa: F811
    return client.CoreV1Api(api_client).read_node("node-a").metadata.labels or {}


def ours(api_client: client.ApiClient) -> dict[str, str]:  # noqa: F811
    return {k: v for k, v in node_labels(api_client).items() if "nodecache.io" in k}


def place(crs: client.CustomObjectsApi, uri: str, *models: tuple[str, bool]) -> None:
    entries = [{"modelName": m, "sourceModelUri": uri, "warm": warm} for m, warm in models]
    crs.patch_cluster_custom_object(G, V, "localmodelnodes", "node-a",
                                    {"spec": {"localModels": entries}})  # fmt: skip


def test_labels_follow_the_models_disk_then_warm_then_gone(
    crs: client.CustomObjectsApi,
    api_client: client.ApiClient,  # noqa: F811
    fake_api: FakeApiServer,  # noqa: F811
    node_a: ClusterAgent,
    mlp_dir: Path,
) -> None:
    uri = mlp_dir.as_uri()
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object("mlp", uri))
    secret = cache_object("secret", uri, "LocalModelNamespaceCache")
    crs.create_namespaced_custom_object(G, V, "team", "localmodelnamespacecaches", secret)
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object(LONG, uri))
    crs.create_cluster_custom_object(G, V, "localmodelnodes", {"metadata": {"name": "node-a"}})
    wait_for(lambda: ours(api_client) == {}, what="the label left from a past run removed")

    place(crs, uri, ("mlp", False), ("team/secret", False), (LONG, False))
    disk = {"cache.nodecache.io/mlp": "disk", "team.cache.nodecache.io/secret": "disk"}
    wait_for(lambda: ours(api_client) == disk, what="disk labels")

    place(crs, uri, ("mlp", True), ("team/secret", False), (LONG, False))
    warm = {**disk, "cache.nodecache.io/mlp": "warm"}
    wait_for(lambda: ours(api_client) == warm, what="mlp labelled warm")
    models = crs.get_cluster_custom_object(G, V, "localmodelnodes", "node-a")["status"][
        "modelStatus"
    ]
    assert models["mlp"]["nodeLabel"] == "cache.nodecache.io/mlp"
    assert (
        models[LONG]["state"] == "Downloaded" and "at most 63" in models[LONG]["nodeLabelSkipped"]
    )

    place(crs, uri, ("team/secret", False))
    wait_for(
        lambda: ours(api_client) == {"team.cache.nodecache.io/secret": "disk"},
        what="mlp's label gone",
    )
    place(crs, uri)
    wait_for(lambda: ours(api_client) == {}, what="every model label gone")
    assert node_labels(api_client) == FOREIGN, "others' labels are never touched"

    # Coalesced: label patches ride on status writes, never more of them.
    patches = [p for m, p in fake_api.requests if m == "PATCH"]
    label_writes = sum(p.startswith("/api/v1/nodes/node-a") for p in patches)
    status_writes = sum(
        p.startswith(f"/apis/{G}/{V}/localmodelnodes/node-a/status") for p in patches
    )
    assert 5 <= label_writes <= status_writes, (label_writes, status_writes)


def test_many_models_at_once_cost_no_more_label_writes_than_status_writes(
    crs: client.CustomObjectsApi,
    api_client: client.ApiClient,  # noqa: F811
    fake_api: FakeApiServer,  # noqa: F811
    node_a: ClusterAgent,
    mlp_dir: Path,
) -> None:
    uri = mlp_dir.as_uri()
    names = [f"m{i}" for i in range(8)]
    for name in names:
        crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object(name, uri))
    crs.create_cluster_custom_object(G, V, "localmodelnodes", {"metadata": {"name": "node-a"}})
    wait_for(lambda: ours(api_client) == {}, what="the label left from a past run removed")
    before = len(fake_api.requests)
    place(crs, uri, *((name, False) for name in names))
    want = {f"cache.nodecache.io/{name}": "disk" for name in names}
    wait_for(lambda: ours(api_client) == want, what="eight disk labels")
    patches = [p for m, p in fake_api.requests[before:] if m == "PATCH"]
    label_writes = sum(p.startswith("/api/v1/nodes/") for p in patches)
    status_writes = sum(p.endswith("/status") for p in patches)
    assert 1 <= label_writes <= status_writes, (label_writes, status_writes)


# -- the admission policy, evaluated like the apiserver -------------------------


def manifests(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DAEMONSET / name).read_text()) if d]


@pytest.fixture(scope="module")
def policy() -> dict[str, Any]:
    docs = manifests("rbac/agent-node-labels.yaml")
    return next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")["spec"]


class Admission:
    """One UPDATE of a Node through the policy: matchConditions, variables, validations."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = celpy.Environment()
        self.spec = spec
        self.compiled = {
            e: env.program(env.compile(e))
            for e in [c["expression"] for c in spec["matchConditions"]]
            + [v["expression"] for v in spec["variables"]]
            + [v["expression"] for v in spec["validations"]]
        }

    def refusals(self, user: str, claim: str | None, old: dict, new: dict) -> list[str] | None:
        """Messages of failed validations; None when the policy does not apply."""
        extra = {"authentication.kubernetes.io/node-name": [claim]} if claim else {}
        activation: dict[str, Any] = {
            "request": celpy.json_to_cel({"userInfo": {"username": user, "extra": extra}}),
            "object": celpy.json_to_cel(new),
            "oldObject": celpy.json_to_cel(old),
        }
        if not all(self._true(c["expression"], activation) for c in self.spec["matchConditions"]):
            return None
        variables: dict[str, Any] = {}
        for v in self.spec["variables"]:
            activation["variables"] = celpy.json_to_cel(variables)
            variables[v["name"]] = _json(self.compiled[v["expression"]].evaluate(activation))
        activation["variables"] = celpy.json_to_cel(variables)
        return [
            v["message"]
            for v in self.spec["validations"]
            if not self._true(v["expression"], activation)
        ]

    def _true(self, expression: str, activation: dict[str, Any]) -> bool:
        result = self.compiled[expression].evaluate(activation)
        assert not isinstance(result, Exception), (expression, result)  # an error fails closed
        return bool(result)


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return str(value) if isinstance(value, str) else value


NODE = {
    "metadata": {"name": "n1", "labels": {**FOREIGN, "cache.nodecache.io/old": "disk"},
                 "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
    "spec": {"podCIDR": "10.0.0.0/24"},
}  # fmt: skip


def changed(**labels: str | None) -> dict[str, Any]:
    new = copy.deepcopy(NODE)
    for key, value in labels.items():
        key = key.replace("__", "/").replace("_", ".")
        if value is None:
            new["metadata"]["labels"].pop(key, None)
        else:
            new["metadata"]["labels"][key] = value
    return new


def test_policy_lets_the_agent_change_only_its_labels_on_its_own_node(
    policy: dict[str, Any],
) -> None:
    admission = Admission(policy)

    def refused(new: dict, claim: str | None = "n1", user: str = AGENT) -> list[str] | None:
        return admission.refusals(user, claim, NODE, new)

    ours_added = changed(
        **{"cache_nodecache_io__mlp": "warm", "team_cache_nodecache_io__s": "disk"}
    )
    assert refused(ours_added) == []
    assert refused(changed(cache_nodecache_io__old=None)) == []  # a model left
    assert refused(changed(cache_nodecache_io__old="warm")) == []
    assert refused(ours_added, claim=None) == []  # a cluster without the node claim
    assert refused(NODE) == []  # nothing changed

    foreign = "a nodecache agent may change only cache.nodecache.io labels of a Node"
    assert refused(changed(kubernetes_io__hostname="other")) == [foreign]
    assert refused(changed(kubernetes_io__hostname=None)) == [foreign]
    assert refused(changed(**{"node-role_kubernetes_io__control-plane": "true"})) == [foreign]
    for key in ("evilcache_nodecache_io__a", "a_b_cache_nodecache_io__c", "nodecache_io__a"):
        assert refused(changed(**{key: "warm"})) == [foreign], key
    assert refused(changed(cache_nodecache_io__mlp="yes")) == [
        "a nodecache.io model label is disk or warm"
    ]

    others = "a nodecache agent may change only labels of a Node (not spec, taints, annotations)"
    tainted = copy.deepcopy(NODE)
    tainted["spec"]["taints"] = [{"key": "k", "effect": "NoSchedule"}]
    cordoned = copy.deepcopy(NODE)
    cordoned["spec"]["unschedulable"] = True
    annotated = copy.deepcopy(NODE)
    annotated["metadata"]["annotations"]["x"] = "y"
    finalized = copy.deepcopy(NODE)
    finalized["metadata"]["finalizers"] = ["example.com/keep"]
    for new in (tainted, cordoned, annotated, finalized):
        assert refused(new) == [others]

    own = "a nodecache agent may label only its own Node"
    assert refused(ours_added, claim="n2") == [own]
    # The policy is for the agent alone: kubelet and people are not held to it.
    assert refused(tainted, user="system:node:n1") is None


def test_policy_prefixes_are_the_agents_own(policy: dict[str, Any]) -> None:
    """The regex the policy holds the agent to is the one the agent uses, and every key the
    agent can produce passes it."""
    (ours_var,) = [v for v in policy["variables"] if v["name"] == "ours"]
    env = celpy.Environment()
    assert str(env.program(env.compile(ours_var["expression"])).evaluate({})) == OWN_KEY
    for name in ("a", "resnet50", "llama-3.1-8b", "m" * 63, "ns/a", f"{'n' * 63}/x_y.z"):
        key, _ = label_key(name)
        assert key is not None and is_ours(key), name


def test_rbac_and_policy_install_with_the_base() -> None:
    kustomization = yaml.safe_load((DAEMONSET / "kustomization.yaml").read_text())
    assert "rbac/agent-node-labels.yaml" in kustomization["resources"]
    docs = manifests("rbac/agent-node-labels.yaml")
    for doc in docs:
        kubernetes_validate.validate(doc, "1.32", strict=True)
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["validationActions"] == ["Deny"]


def test_example_prefers_nodes_where_its_model_is_warm() -> None:
    (pod,) = manifests("examples/node-affinity.yaml")
    kubernetes_validate.validate(pod, "1.32", strict=True)
    preferred = pod["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    terms = {
        (e["key"], tuple(e["values"])): term["weight"]
        for term in preferred
        for e in term["preference"]["matchExpressions"]
    }
    key, _ = label_key("resnet50")
    assert terms == {(key, ("warm",)): 100, (key, ("disk",)): 50}
    assert not any("hostPath" in v for v in pod["spec"]["volumes"])
