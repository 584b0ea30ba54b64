"""The node agent in cluster mode, against the fake API server through the real client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from kubefake.fixtures import api_client, fake_api  # noqa: F401 (fixtures)
from kubefake.harness import ClusterAgent
from kubefake.rbac import denied_calls
from kubefake.server import FakeApiServer
from kubernetes import client
from prometheus_client import REGISTRY
from support import orphaned_connection, wait_for

from nodecache.agent.kube.callers import pod_uid_of
from nodecache.agent.kube.nodestatus import RequestRates, StatusWriter, node_status, resolve
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc

G, V = "nodecache.io", "v1alpha1"


def cache_object(name: str, uri: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "LocalModelCache",
        "metadata": {"name": name},
        "spec": {"sourceModelUri": uri, "modelSize": "1Mi", "nodeGroups": ["default"], **spec},
    }


def infer(agent: ClusterAgent, model: str) -> int:
    x = np.ones((1, 64), np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    return agent.request("POST", f"/v2/models/{model}/infer", body)[0]


@pytest.fixture
def crs(api_client: client.ApiClient) -> client.CustomObjectsApi:  # noqa: F811
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def node_a(fake_api: FakeApiServer, tmp_path: Path) -> Iterator[ClusterAgent]:  # noqa: F811
    agent = ClusterAgent(fake_api, tmp_path / "node-a", "node-a").start()
    yield agent
    agent.stop()
    assert fake_api.pruned == [], "the agent wrote fields the CRD schema does not have"
    assert denied_calls(fake_api) == [], "the agent's RBAC would refuse these"


def node_status_of(crs: client.CustomObjectsApi, name: str = "node-a") -> dict[str, Any]:
    return crs.get_cluster_custom_object(G, V, "localmodelnodes", name).get("status") or {}


def model_state(crs: client.CustomObjectsApi, model: str) -> str | None:
    return (node_status_of(crs).get("modelStatus") or {}).get(model, {}).get("state")


def set_models(crs: client.CustomObjectsApi, *models: tuple[str, str]) -> None:
    body = {"spec": {"localModels": [{"modelName": m, "sourceModelUri": u} for m, u in models]}}
    crs.patch_cluster_custom_object(G, V, "localmodelnodes", "node-a", body)


def test_model_in_spec_becomes_warm_and_status_says_so_then_leaves(
    crs: client.CustomObjectsApi, node_a: ClusterAgent, mlp_dir: Path
) -> None:
    uri = mlp_dir.as_uri()
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object("mlp", uri))
    node = {"metadata": {"name": "node-a"}, "spec": {"localModels": []}}
    crs.create_cluster_custom_object(G, V, "localmodelnodes", node)
    set_models(crs, ("mlp", uri))
    wait_for(lambda: model_state(crs, "mlp") == "Warm", what="mlp Warm in status")
    assert infer(node_a, "mlp") == 200
    status = node_status_of(crs)
    entry = status["modelStatus"]["mlp"]
    assert entry["bytes"] == entry["bytesTotal"] > 0 and entry["progress"] == 100
    assert entry["sourceModelUri"] == uri and entry["device"] == "cpu"
    assert status["capacity"]["disk"]["total"] >= status["capacity"]["disk"]["free"] > 0
    assert status["capacity"]["devices"][-1]["name"] == "cpu"
    assert status["heartbeat"] and status["summary"] == {"models": 1, "warm": 1, "errors": 0}

    set_models(crs)
    wait_for(lambda: "mlp" not in (node_status_of(crs).get("modelStatus") or {}), what="gone")
    wait_for(lambda: node_a.request("GET", "/v2/models/mlp/ready")[0] == 404, what="unserved")
    assert not any((node_a.options.node.cache_dir / "models").glob("*/*.onnx"))


def test_a_missing_or_invalid_cache_is_reported_not_fatal(
    crs: client.CustomObjectsApi, node_a: ClusterAgent, mlp_dir: Path
) -> None:
    uri = mlp_dir.as_uri()
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object("mlp", uri))
    node = {"metadata": {"name": "node-a"}, "spec": {"localModels": [
        {"modelName": "mlp", "sourceModelUri": uri},
        {"modelName": "ghost", "sourceModelUri": "s3://b/ghost/"},
    ]}}  # fmt: skip
    crs.create_cluster_custom_object(G, V, "localmodelnodes", node)
    wait_for(lambda: model_state(crs, "mlp") == "Warm", what="mlp Warm")
    ghost = node_status_of(crs)["modelStatus"]["ghost"]
    assert ghost == {"state": "Error", "error": "LocalModelCache ghost not found"}


def test_api_server_away_serving_continues_then_status_catches_up(
    crs: client.CustomObjectsApi,
    node_a: ClusterAgent,
    fake_api: FakeApiServer,  # noqa: F811
    mlp_dir: Path,
) -> None:
    uri = mlp_dir.as_uri()
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object("mlp", uri))
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object("second", uri))
    node = {"metadata": {"name": "node-a"}, "spec": {"localModels": [
        {"modelName": "mlp", "sourceModelUri": uri}]}}  # fmt: skip
    crs.create_cluster_custom_object(G, V, "localmodelnodes", node)
    wait_for(lambda: model_state(crs, "mlp") == "Warm", what="mlp Warm")

    def restarts() -> float:
        labels = {"resource": "localmodelnodes", "reason": "unavailable"}
        return REGISTRY.get_sample_value("nodecache_kube_watch_restarts_total", labels) or 0

    before = restarts()
    fake_api.stop()
    wait_for(lambda: restarts() > before, what="the agent to notice the API server is away")
    for _ in range(5):
        assert infer(node_a, "mlp") == 200  # warm models answer without the API server
    fake_api.compact()  # and when it is back, the agent's resourceVersion is too old
    fake_api.start()
    set_models(crs, ("mlp", uri), ("second", uri))
    wait_for(lambda: model_state(crs, "second") == "Warm", what="second Warm after outage")
    assert infer(node_a, "second") == 200


def test_watch_is_of_the_agents_own_node_only(
    crs: client.CustomObjectsApi,
    node_a: ClusterAgent,
    fake_api: FakeApiServer,  # noqa: F811
) -> None:
    crs.create_cluster_custom_object(G, V, "localmodelnodes", {"metadata": {"name": "node-a"}})
    wait_for(lambda: node_status_of(crs).get("heartbeat"), what="a heartbeat")
    node_requests = [  # list and watch calls (the test's own GETs name the object)
        p for m, p in fake_api.requests if m == "GET" and "/localmodelnodes?" in p
    ]
    assert node_requests and all(
        "fieldSelector=metadata.name%3Dnode-a" in p for p in node_requests
    ), node_requests


# -- pure parts ---------------------------------------------------------------


def test_resolve_maps_entries_to_caches() -> None:
    uri = "s3://bucket/m/"
    caches = {
        ("", "a"): cache_object("a", uri),
        ("team", "b"): {
            **cache_object("b", uri),
            "kind": "LocalModelNamespaceCache",
            "metadata": {"name": "b", "namespace": "team"},
        },
        ("", "bad"): cache_object("bad", "ftp://x/"),
    }
    entries = [{"modelName": m, "sourceModelUri": uri} for m in ("a", "team/b", "bad", "none")]
    node = {"metadata": {"name": "n"}, "spec": {"localModels": entries}}
    out = resolve(node, caches)
    # A namespaced cache is keyed by its namespace on the node: two namespaces' "b" coexist.
    assert set(out.declarations) == {"a", "team/b"}
    assert out.origins == {"a": "LocalModelCache/a", "team/b": "LocalModelNamespaceCache/team/b"}
    assert "sourceModelUri" in out.errors["bad"] and "not found" in out.errors["none"]
    assert not out.complete
    assert resolve(None, caches).complete is False


def test_node_status_from_agent_status() -> None:
    agent = {
        "models": [
            {
                "name": "b",
                "state": "Downloading",
                "source": "s3://x",
                "bytes": 50,
                "bytesTotal": 200,
                "error": None,
                "nextRetry": None,
            },
        ],
        "cache": {"usedBytes": 10},
        "devices": [{"name": "cpu", "total": 8, "budget": 4, "used": 1, "free": 3}],
    }
    status = node_status(
        agent,
        disk={"total": 100, "free": 40},
        origins={"b": "LocalModelNamespaceCache/team/b"},
        errors={"c": "LocalModelCache c not found"},
        generation=3,
    )
    assert status["modelStatus"]["team/b"] == {
        "state": "Downloading", "sourceModelUri": "s3://x", "bytes": 50, "bytesTotal": 200,
        "progress": 25,
    }  # fmt: skip
    assert status["modelStatus"]["c"]["state"] == "Error"
    assert status["summary"] == {"models": 2, "warm": 0, "errors": 1}
    assert status["capacity"]["disk"] == {"total": 100, "free": 40, "used": 10}
    assert status["observedGeneration"] == 3


def test_status_writes_are_coalesced() -> None:
    writer = StatusWriter(None, "n", dict, min_interval=10, heartbeat_interval=30)  # type: ignore[arg-type]
    assert writer.due({"a": 1}, now=0)
    writer.written({"a": 1}, now=0.0)
    changes = [{"a": i} for i in range(100)]
    assert not any(writer.due(c, now=5) for c in changes)  # many changes, no write yet
    assert writer.due(changes[-1], now=10)  # one write carries them all
    assert not writer.due({"a": 1}, now=29)  # unchanged: only the heartbeat
    assert writer.due({"a": 1}, now=30)


def test_request_rates_over_a_window() -> None:
    now, counts = [0.0], {"a": 0.0}
    rates = RequestRates(10, counts=lambda: dict(counts), clock=lambda: now[0])
    assert rates.rates() == {}
    for _ in range(20):  # 5 requests a second for 20 s
        now[0] += 1
        counts["a"] += 5
        assert rates.rates() == {"a": 5.0}
    for _ in range(12):  # then idle: the rate drops out once the window has passed
        now[0] += 1
        last = rates.rates()
    assert last == {}


def test_namespaced_models_answer_only_to_pods_of_their_namespace(
    crs: client.CustomObjectsApi,
    api_client: client.ApiClient,  # noqa: F811
    fake_api: FakeApiServer,  # noqa: F811
    mlp_dir: Path,
    tmp_path: Path,
) -> None:
    """Peer credentials of this test process, mapped to a pod by a cgroup file we write."""
    uri = mlp_dir.as_uri()
    crs.create_namespaced_custom_object(G, V, "team", "localmodelnamespacecaches", {
        **cache_object("secret", uri), "kind": "LocalModelNamespaceCache"})  # fmt: skip
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object("open", uri))
    crs.create_cluster_custom_object(G, V, "localmodelcaches", cache_object(
        "listed", uri, allowedNamespaces=["team", "ops"]))  # fmt: skip
    node = {
        "metadata": {"name": "node-a"},
        "spec": {
            "localModels": [
                {"modelName": m, "sourceModelUri": uri}
                for m in ("team/secret", "open", "listed", "team/gone")  # gone: no such cache
            ]
        },
    }
    crs.create_cluster_custom_object(G, V, "localmodelnodes", node)  # fmt: skip
    core = client.CoreV1Api(api_client)
    pods = {}
    for ns in ("team", "other"):
        pod = {"metadata": {"name": "caller"}, "spec": {"nodeName": "node-a", "containers": []}}
        pods[ns] = core.create_namespaced_pod(ns, pod).metadata.uid
    cgroup = tmp_path / "proc" / str(os.getpid()) / "cgroup"
    cgroup.parent.mkdir(parents=True)

    def run_as_pod_of(ns: str | None) -> None:
        if ns is None:
            cgroup.write_text("0::/user.slice/user-0.slice/session-1.scope\n")
            return
        uid = pods[ns].replace("-", "_")  # the systemd cgroup driver's spelling
        cgroup.write_text(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/"
            "cri-containerd-0123abcd.scope\n"
        )

    agent = ClusterAgent(fake_api, tmp_path / "node-a", "node-a", proc_root=tmp_path / "proc")
    agent.start()
    try:
        for model in ("team/secret", "open", "listed"):
            wait_for(lambda m=model: model_state(crs, m) == "Warm", what=f"{model} Warm")
        run_as_pod_of("team")
        wait_for(lambda: infer(agent, "secret") == 200, what="the team pod is let in")
        assert infer(agent, "listed") == 200 and infer(agent, "open") == 200
        run_as_pod_of("other")
        # Another namespace's model is not found, as an undeclared one: no owner named,
        # and a bad body is answered alike (its name is not checked sooner).
        assert infer(agent, "secret") == infer(agent, "undeclared") == 404
        code, body = agent.request("POST", "/v2/models/secret/infer", {"inputs": []})
        assert (code, body) == agent.request("POST", "/v2/models/undeclared/infer", {"inputs": []})
        code, body = agent.request("GET", "/v2/models/secret")
        assert code == 404 and "team" not in body["error"]
        assert infer(agent, "listed") == 404 and infer(agent, "open") == 200
        assert index_names(agent) == {"open"}
        status = agent.request("GET", "/nodecache/v1/status")[1]
        assert {m["name"] for m in status["models"]} == {"open"}
        assert status["declarationErrors"] == []  # team/gone is team's to know of
        run_as_pod_of(None)  # not a pod at all
        assert infer(agent, "secret") == 404 and infer(agent, "open") == 200
        assert index_names(agent) == {"open"}
        run_as_pod_of("team")  # the index lists what the caller may use, no more
        assert index_names(agent) == {"secret", "open", "listed"}
        errors = agent.request("GET", "/nodecache/v1/status")[1]["declarationErrors"]
        assert [e["file"] for e in errors] == ["team/gone"]
        # A connection whose connector has exited is no one's, whatever holds it or its PID.
        with orphaned_connection(agent.socket) as conn:
            conn.sendall(b"GET /v2/models/secret HTTP/1.1\r\nHost: node\r\n\r\n")
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 403") and b"reconnect" in answer, answer[:300]
    finally:
        agent.stop()
    assert fake_api.pruned == [] and denied_calls(fake_api) == []


def index_names(agent: ClusterAgent) -> set[str]:
    code, body = agent.request("POST", "/v2/repository/index", {})
    assert code == 200, body
    return {entry["name"] for entry in body}


def test_pod_uid_from_both_cgroup_layouts(tmp_path: Path) -> None:
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    layouts = {
        1: f"12:memory:/kubepods/besteffort/pod{uid}/0123abcd\n",  # cgroupfs driver, v1
        2: f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-o-1.scope\n",
        3: "0::/system.slice/sshd.service\n",
    }
    for pid, text in layouts.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    assert [pod_uid_of(pid, tmp_path) for pid in (1, 2, 3, 4)] == [uid, uid, None, None]


def test_rbac_check_refuses_what_the_roles_do_not_grant(fake_api: FakeApiServer) -> None:  # noqa: F811
    nc = "/apis/nodecache.io/v1alpha1"
    lease = "/apis/coordination.k8s.io/v1/namespaces/nodecache-system/leases"
    fake_api.calls[:] = [
        ("agent", "PATCH", f"{nc}/localmodelnodes/n1/status"),  # allowed
        ("agent", "PATCH", f"{nc}/localmodelnodes/n1"),  # spec is the reconciler's
        ("agent", "PATCH", f"{nc}/localmodelcaches/m"),
        ("reconciler", "PUT", f"{lease}/nodecache-reconciler"),  # allowed
        ("reconciler", "PUT", f"{lease}/someone-else"),
        ("reconciler", "POST", "/apis/coordination.k8s.io/v1/namespaces/default/leases"),
    ]
    assert denied_calls(fake_api) == [
        "agent: patch localmodelcaches /m",
        "agent: patch localmodelnodes /n1",
        "reconciler: create leases default/",
        "reconciler: update leases nodecache-system/someone-else",
    ]


def test_connect_finds_the_api_server_through_kubeconfig(
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No in-cluster service account here: $KUBECONFIG is next, then ~/.kube/config."""
    from nodecache.agent.kube.api import connect

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(fake_api.write_kubeconfig(tmp_path / "env-config")))
    assert connect().configuration.host == fake_api.url
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kube").mkdir()
    fake_api.write_kubeconfig(tmp_path / ".kube" / "config")
    assert connect().configuration.host == fake_api.url


def test_two_namespaces_each_reach_their_own_cache_of_one_name(
    crs: client.CustomObjectsApi,
    api_client: client.ApiClient,  # noqa: F811
    fake_api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Caches named fraud in two namespaces and the cluster scope, on one node: a pod gets
    its namespace's, a pod of a third namespace (and gRPC, which cannot tell) the cluster's."""
    runtime = {"runtime": "python", "entrypoint": "model:Versioned"}
    entries = []
    for factor, namespace in ((1, "team-a"), (2, "team-b"), (3, None)):
        uri = versioned_model(tmp_path, factor).as_uri()
        body = cache_object("fraud", uri, **runtime)
        if namespace is None:
            crs.create_cluster_custom_object(G, V, "localmodelcaches", body)
        else:
            body["kind"] = "LocalModelNamespaceCache"
            crs.create_namespaced_custom_object(G, V, namespace, "localmodelnamespacecaches", body)
        model_name = f"{namespace}/fraud" if namespace else "fraud"
        entries.append({"modelName": model_name, "sourceModelUri": uri})
    node = {"metadata": {"name": "node-a"}, "spec": {"localModels": entries}}
    crs.create_cluster_custom_object(G, V, "localmodelnodes", node)
    core = client.CoreV1Api(api_client)
    pods = {}
    for ns in ("team-a", "team-b", "other"):
        pod = {"metadata": {"name": "caller"}, "spec": {"nodeName": "node-a", "containers": []}}
        pods[ns] = core.create_namespaced_pod(ns, pod).metadata.uid
    cgroup = tmp_path / "proc" / str(os.getpid()) / "cgroup"
    cgroup.parent.mkdir(parents=True)

    def as_pod_of(ns: str) -> None:
        cgroup.write_text(f"0::/kubepods/burstable/pod{pods[ns]}/0123abcd\n")

    def fraud() -> float:
        code, doc = agent.request("POST", "/v2/models/fraud/infer", VERSIONED_BODY)
        assert code == 200, doc
        assert doc["model_name"] == "fraud"
        return float(doc["outputs"][0]["data"][0])

    agent = ClusterAgent(fake_api, tmp_path / "node-a", "node-a", proc_root=tmp_path / "proc")
    agent.start()
    try:
        for model in ("team-a/fraud", "team-b/fraud", "fraud"):
            wait_for(lambda m=model: model_state(crs, m) == "Warm", what=f"{model} Warm")
        for ns, factor in (("team-a", 1.0), ("team-b", 2.0), ("other", 3.0)):
            as_pod_of(ns)
            wait_for(lambda f=factor: fraud() == f, what=f"{ns} reaches its fraud")
            names = {m["name"] for m in agent.request("GET", "/nodecache/v1/status")[1]["models"]}
            # Only what the caller reaches: the shadowed cluster cache is not listed.
            assert names == ({f"{ns}/fraud"} if ns != "other" else {"fraud"})
        as_pod_of("team-a")
        assert fraud() == 1.0
        # The node's own key of another namespace's cache is no name a caller can use.
        code, _ = agent.request("POST", "/v2/models/team-b%2Ffraud/infer", VERSIONED_BODY)
        assert code == 404
        # gRPC cannot tell the caller's pod: it reaches the cluster's cache, as any non-pod.
        channel = grpc.insecure_channel(f"unix:{agent.socket.parent / 'nodecache-grpc.sock'}")
        with channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(grpc_request())
        assert np.frombuffer(reply.raw_output_contents[0], np.float32)[0] == 3.0
    finally:
        agent.stop()
    assert fake_api.pruned == [] and denied_calls(fake_api) == []


VERSIONED_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}


def grpc_request() -> Any:
    from test_versions import grpc_request

    return grpc_request()


def versioned_model(root: Path, factor: int) -> Path:
    from test_versions import model

    return model(root, factor)
