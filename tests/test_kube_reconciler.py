"""The reconciler and in-process agents against the fake API server: a small cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubefake.fixtures import api_client, fake_api  # noqa: F401 (fixtures)
from kubefake.harness import ClusterAgent, ClusterReconciler
from kubefake.rbac import denied_calls
from kubefake.server import FakeApiServer
from kubernetes import client
from kubernetes.client.rest import ApiException
from object_stores import S3Server
from support import wait_for
from test_cache_s3 import upload

from nodecache.agent.kube.placement import FINALIZER
from nodecache.serve.examples import write_mlp_onnx

G, V = "nodecache.io", "v1alpha1"


def make_node(core: client.CoreV1Api, name: str, ready: bool = True) -> None:
    core.create_node({"metadata": {"name": name, "labels": {"pool": "cpu"}}})
    # Status is written through /status, as the kubelet does (create ignores it).
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    core.patch_node_status(name, {"status": {"conditions": [condition]}})


@pytest.fixture
def crs(api_client: client.ApiClient) -> client.CustomObjectsApi:  # noqa: F811
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:  # noqa: F811
    return client.CoreV1Api(api_client)


@pytest.fixture
def cluster(
    fake_api: FakeApiServer,  # noqa: F811
    core: client.CoreV1Api,
    crs: client.CustomObjectsApi,
    tmp_path: Path,
) -> Iterator[dict[str, Any]]:
    """Two Ready nodes in group "cpu", each with an agent, and the reconciler."""
    for name in ("n1", "n2"):
        make_node(core, name)
    crs.create_cluster_custom_object(G, V, "localmodelnodegroups", {
        "apiVersion": f"{G}/{V}", "kind": "LocalModelNodeGroup", "metadata": {"name": "cpu"},
        "spec": {"nodeSelector": {"pool": "cpu"}, "storageLimit": "1Gi"},
    })  # fmt: skip
    agents = {
        n: ClusterAgent(fake_api, tmp_path / n, n, rate_window=1.0).start() for n in ("n1", "n2")
    }
    reconciler = ClusterReconciler(fake_api, tmp_path / "reconciler", "r1").start()
    yield {"agents": agents, "reconciler": reconciler}
    reconciler.stop()
    for agent in agents.values():
        agent.stop()
    assert fake_api.pruned == [], "a write carried fields the CRD schema does not have"
    assert denied_calls(fake_api) == [], "RBAC in daemonset/ would refuse these"


def get_cache(crs: client.CustomObjectsApi, name: str = "mlp") -> dict[str, Any]:
    return crs.get_cluster_custom_object(G, V, "localmodelcaches", name)


def cache_status(crs: client.CustomObjectsApi, name: str = "mlp") -> dict[str, Any]:
    try:
        return get_cache(crs, name).get("status") or {}
    except ApiException:
        return {}


def ready(status: dict[str, Any]) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), None)


def test_declare_scale_lose_a_node_delete(
    cluster: dict[str, Any],
    crs: client.CustomObjectsApi,
    core: client.CoreV1Api,
    mlp_dir: Path,
) -> None:
    uri = mlp_dir.as_uri()
    crs.create_cluster_custom_object(G, V, "localmodelcaches", {
        "apiVersion": f"{G}/{V}", "kind": "LocalModelCache", "metadata": {"name": "mlp"},
        "spec": {"sourceModelUri": uri, "modelSize": "1Mi", "nodeGroups": ["cpu"],
                 "warm": {"minReplicas": 1, "maxReplicas": 2}},
    })  # fmt: skip

    # Declared: a copy on each node, both on disk, Ready, finalizer held.
    wait_for(lambda: cache_status(crs).get("copies", {}).get("available") == 2, what="2 copies")
    wait_for(lambda: ready(cache_status(crs)) == "True", what="Ready")
    # One warm copy (idle: minReplicas); the other node keeps its copy on disk only.
    wait_for(
        lambda: sorted(cache_status(crs)["nodeStatus"].values()) == ["Downloaded", "Warm"],
        what="one warm copy, one on disk",
    )
    status = cache_status(crs)
    assert status["warm"]["desired"] == 1
    assert FINALIZER in get_cache(crs)["metadata"]["finalizers"]
    for agent in cluster["agents"].values():
        assert agent.request("GET", "/v2/models/mlp/ready")[0] == 200
    group = crs.get_cluster_custom_object(G, V, "localmodelnodegroups", "cpu")["status"]
    wait_for(
        lambda: (
            crs.get_cluster_custom_object(G, V, "localmodelnodegroups", "cpu")["status"]["used"]
            == "2Mi"
        ),
        what="group usage",
    )
    assert group["nodes"] == 2
    specs = [
        crs.get_cluster_custom_object(G, V, "localmodelnodes", n)["spec"] for n in ("n1", "n2")
    ]
    assert sorted(s["localModels"][0]["warm"] for s in specs) == [False, True]
    events = core.list_namespaced_event("default").items
    assert any(e.reason == "AllCopiesAvailable" and e.involved_object.name == "mlp" for e in events)

    # An HPA (or a person) scales warm copies through /scale: clamped to maxReplicas.
    crs.patch_cluster_custom_object_scale(
        G, V, "localmodelcaches", "mlp", {"spec": {"replicas": 5}}
    )
    wait_for(lambda: cache_status(crs)["warm"]["desired"] == 2, what="warm desired 2")
    wait_for(
        lambda: cache_status(crs)["nodeStatus"] == {"n1": "Warm", "n2": "Warm"},
        what="the second node warms its copy",
    )
    wait_for(
        lambda: (
            crs.get_cluster_custom_object_scale(G, V, "localmodelcaches", "mlp")["status"][
                "replicas"
            ]
            == 2
        ),
        what="/scale reports 2 warm copies",
    )

    # A node goes away: its LocalModelNode is collected, the cache counts one copy.
    cluster["agents"]["n2"].stop()
    core.delete_node("n2")
    wait_for(lambda: _absent(crs, "n2"), what="LocalModelNode n2 collected")
    wait_for(lambda: cache_status(crs).get("copies", {}).get("total") == 1, what="1 copy")
    assert cache_status(crs)["nodeStatus"] == {"n1": "Warm"}

    # Deleting the cache never hangs: unplaced, finalizer released, gone from the node.
    crs.delete_cluster_custom_object(G, V, "localmodelcaches", "mlp")
    wait_for(lambda: not cache_status(crs) and _cache_gone(crs), what="cache deleted")
    n1 = cluster["agents"]["n1"]
    wait_for(lambda: n1.request("GET", "/v2/models/mlp/ready")[0] == 404, what="unserved")
    spec = crs.get_cluster_custom_object(G, V, "localmodelnodes", "n1")["spec"]
    assert spec["localModels"] == []


def test_not_ready_nodes_get_nothing_and_the_reason_is_stated(
    fake_api: FakeApiServer,  # noqa: F811
    crs: client.CustomObjectsApi,
    core: client.CoreV1Api,
    tmp_path: Path,
) -> None:
    make_node(core, "sick", ready=False)
    crs.create_cluster_custom_object(G, V, "localmodelnodegroups", {
        "metadata": {"name": "cpu"}, "spec": {"nodeSelector": {"pool": "cpu"},
                                              "storageLimit": "1Gi"}})  # fmt: skip
    spec = {"sourceModelUri": "s3://bucket/m/", "modelSize": "1Mi", "nodeGroups": ["cpu"]}
    crs.create_cluster_custom_object(
        G, V, "localmodelcaches", {"metadata": {"name": "m"}, "spec": spec}
    )
    reconciler = ClusterReconciler(fake_api, tmp_path, "r1").start()
    try:
        wait_for(lambda: ready(cache_status(crs, "m")) == "False", what="status")
        condition = next(c for c in cache_status(crs, "m")["conditions"] if c["type"] == "Ready")
        assert condition["reason"] == "NoReadyNodes" and "nodeSelector" in condition["message"]
        spec = crs.get_cluster_custom_object(G, V, "localmodelnodes", "sick")["spec"]
        assert spec["localModels"] == []
    finally:
        reconciler.stop()


def test_one_leader_at_a_time_and_a_standby_takes_over(
    fake_api: FakeApiServer,  # noqa: F811
    api_client: client.ApiClient,  # noqa: F811
    tmp_path: Path,
) -> None:
    a = ClusterReconciler(fake_api, tmp_path, "a").start()
    b = ClusterReconciler(fake_api, tmp_path, "b").start()
    try:
        wait_for(lambda: a.leading or b.leading, what="a leader")
        leases = client.CoordinationV1Api(api_client)
        for _ in range(10):  # never both, however often we look
            assert not (a.leading and b.leading)
        leader, standby = (a, b) if a.leading else (b, a)
        holder = leases.read_namespaced_lease("nodecache-reconciler", "nodecache-system")
        assert holder.spec.holder_identity == leader.options.identity
        leader.stop()
        wait_for(lambda: standby.leading, what="the standby to take over")
        lease = leases.read_namespaced_lease("nodecache-reconciler", "nodecache-system")
        assert lease.spec.holder_identity == standby.options.identity
        assert lease.spec.lease_transitions == 1
    finally:
        a.stop()
        b.stop()
    assert denied_calls(fake_api) == []


def _absent(crs: client.CustomObjectsApi, name: str) -> bool:
    try:
        crs.get_cluster_custom_object(G, V, "localmodelnodes", name)
    except ApiException as exc:
        return exc.status == 404
    return False


def _cache_gone(crs: client.CustomObjectsApi) -> bool:
    try:
        get_cache(crs)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_warm_copies_follow_load_from_s3(
    cluster: dict[str, Any],
    crs: client.CustomObjectsApi,
    s3: S3Server,
    tmp_path: Path,
) -> None:
    """Both agents fetch from a real S3 server; warm copies rise under load, fall when idle."""
    write_mlp_onnx(tmp_path / "model.onnx")
    upload(s3, "sim/mlp", {"model.onnx": (tmp_path / "model.onnx").read_bytes()})
    policy = {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerSecond": 2}
    crs.create_cluster_custom_object(G, V, "localmodelcaches", {
        "metadata": {"name": "mlp"},
        "spec": {"sourceModelUri": f"s3://{s3.bucket}/sim/mlp/", "modelSize": "1Mi",
                 "nodeGroups": ["cpu"], "warm": policy},
    })  # fmt: skip
    wait_for(lambda: cache_status(crs).get("copies", {}).get("available") == 2, what="2 copies")
    assert cache_status(crs)["warm"]["desired"] == 1

    def warm_flags() -> list[bool]:
        return [
            crs.get_cluster_custom_object(G, V, "localmodelnodes", n)["spec"]["localModels"][0][
                "warm"
            ]
            for n in ("n1", "n2")
        ]

    n1 = cluster["agents"]["n1"]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.5] * 64}]}  # fmt: skip

    def loaded() -> bool:
        for _ in range(20):
            assert n1.request("POST", "/v2/models/mlp/infer", body)[0] == 200
        return cache_status(crs)["warm"]["desired"] == 2

    wait_for(loaded, what="a second warm copy under load")
    assert sorted(warm_flags()) == [True, True]
    wait_for(lambda: cache_status(crs)["warm"]["desired"] == 1, what="back to one when idle")
    wait_for(lambda: sorted(warm_flags()) == [False, True], what="one warm flag")


def test_converges_and_then_writes_nothing(
    fake_api: FakeApiServer,  # noqa: F811
    crs: client.CustomObjectsApi,
    core: client.CoreV1Api,
    tmp_path: Path,
) -> None:
    """60 nodes, 3 groups, 30 caches: placed once, then passes find nothing to write."""
    for i in range(60):
        core.create_node({"metadata": {"name": f"n{i}", "labels": {"zone": f"z{i % 3}"}}})
        core.patch_node_status(f"n{i}", {"status": {"conditions": [
            {"type": "Ready", "status": "True"}]}})  # fmt: skip
    for z in range(3):
        crs.create_cluster_custom_object(G, V, "localmodelnodegroups", {
            "metadata": {"name": f"z{z}"},
            "spec": {"nodeSelector": {"zone": f"z{z}"}, "storageLimit": "10Gi"}})  # fmt: skip
    for c in range(30):
        crs.create_cluster_custom_object(G, V, "localmodelcaches", {
            "metadata": {"name": f"c{c}"},
            "spec": {"sourceModelUri": f"s3://bucket/c{c}/", "modelSize": "1Gi",
                     "nodeGroups": [f"z{c % 3}"], "replicas": 4}})  # fmt: skip
    reconciler = ClusterReconciler(fake_api, tmp_path, "r1").start()
    try:

        def placed() -> bool:
            caches = crs.list_cluster_custom_object(G, V, "localmodelcaches")["items"]
            return all((c.get("status") or {}).get("copies", {}).get("total") == 4 for c in caches)

        wait_for(placed, what="every cache placed")
        nodes = crs.list_cluster_custom_object(G, V, "localmodelnodes")["items"]
        per_node = [len(n["spec"]["localModels"]) for n in nodes]
        assert len(nodes) == 60 and sum(per_node) == 120 and max(per_node) == 2  # spread

        wait_for(lambda: reconciler.reconciler.passes > 0, what="a pass")
        passes = reconciler.reconciler.passes
        wait_for(lambda: reconciler.reconciler.passes >= passes + 2, what="two more passes")
        settled, passes = len(fake_api.calls), reconciler.reconciler.passes
        wait_for(lambda: reconciler.reconciler.passes >= passes + 3, what="three more passes")
        later = [f"{m} {p}" for who, m, p in fake_api.calls[settled:]
                 if who == "reconciler" and m != "GET" and "/leases/" not in p]  # fmt: skip
        assert later == [], "lease renewals should be the only writes left"
    finally:
        reconciler.stop()
    assert denied_calls(fake_api) == []


def test_versions_of_a_name_and_a_repeated_version(
    fake_api: FakeApiServer,  # noqa: F811
    crs: client.CustomObjectsApi,
    core: client.CoreV1Api,
    tmp_path: Path,
) -> None:
    """Two versions of `fraud` land on the same node with their shares in status; a third
    cache repeating version 2 is refused with a condition until the one serving it goes."""
    for name in ("n1", "n2"):
        make_node(core, name)
    crs.create_cluster_custom_object(G, V, "localmodelnodegroups", {
        "metadata": {"name": "cpu"}, "spec": {"nodeSelector": {"pool": "cpu"},
                                              "storageLimit": "1Gi"}})  # fmt: skip

    def declare(name: str, version: str, traffic: int) -> None:
        serving = {"name": "fraud", "version": version, "traffic": traffic}
        crs.create_cluster_custom_object(G, V, "localmodelcaches", {
            "metadata": {"name": name},
            "spec": {"sourceModelUri": f"s3://bucket/{name}/", "modelSize": "1Mi",
                     "nodeGroups": ["cpu"], "replicas": 1, "serving": serving}})  # fmt: skip

    declare("fraud-v1", "1", 90)
    declare("fraud-v2", "2", 10)
    declare("fraud-v2-copy", "2", 50)  # created last (or, in the same second, named last)
    reconciler = ClusterReconciler(fake_api, tmp_path, "r1").start()
    try:

        def reason(name: str) -> str | None:
            conditions = cache_status(crs, name).get("conditions", [])
            return next((c["reason"] for c in conditions if c["type"] == "Ready"), None)

        wait_for(lambda: reason("fraud-v2-copy") == "DuplicateVersion", what="refused")
        refused = cache_status(crs, "fraud-v2-copy")
        ready_condition = next(c for c in refused["conditions"] if c["type"] == "Ready")
        assert "LocalModelCache fraud-v2 " in ready_condition["message"]
        wait_for(lambda: cache_status(crs, "fraud-v2").get("serving", {}).get("share") == 10,
                 what="v2's share")  # fmt: skip
        assert cache_status(crs, "fraud-v1")["serving"] == {
            "name": "fraud", "version": "1", "traffic": 90, "mirror": 0, "share": 90,
            "versions": ["1", "2"]}  # fmt: skip
        nodes = {n: [e["modelName"] for e in crs.get_cluster_custom_object(
            G, V, "localmodelnodes", n)["spec"]["localModels"]] for n in ("n1", "n2")}  # fmt: skip
        assert sorted(nodes.values()) == [[], ["fraud-v1", "fraud-v2"]], "together, copy unplaced"

        # Weights move: the shares in status follow; the one serving version 2 goes away.
        for name, traffic in (("fraud-v1", 0), ("fraud-v2", 100)):
            body = {"spec": {"serving": {"traffic": traffic}}}
            crs.patch_cluster_custom_object(G, V, "localmodelcaches", name, body)
        wait_for(lambda: cache_status(crs, "fraud-v2")["serving"]["share"] == 100, what="100%")
        crs.delete_cluster_custom_object(G, V, "localmodelcaches", "fraud-v2")
        wait_for(lambda: reason("fraud-v2-copy") == "CopiesPending", what="the copy placed")
        assert cache_status(crs, "fraud-v2-copy")["serving"]["share"] == 100
    finally:
        reconciler.stop()
    assert fake_api.pruned == [], "a status field the CRD schema does not have"
    assert denied_calls(fake_api) == []


def test_a_canary_on_real_agents_is_warm_with_its_name_and_reports_each_nodes_weights(
    cluster: dict[str, Any],
    crs: client.CustomObjectsApi,
    mlp_dir: Path,
    tmp_path: Path,
) -> None:
    """Version 2 of `mlp` joins version 1 at traffic 10: both warm on the same node, each
    node's applied weights in the cache's status, and the node answers from both."""
    v2_dir = tmp_path / "mlp-v2"
    v2_dir.mkdir()
    (v2_dir / "model.onnx").write_bytes((mlp_dir / "model.onnx").read_bytes())
    for name, folder, version, traffic in (
        ("mlp-v1", mlp_dir, "1", 90),
        ("mlp-v2", v2_dir, "2", 10),
    ):
        crs.create_cluster_custom_object(G, V, "localmodelcaches", {
            "metadata": {"name": name},
            "spec": {"sourceModelUri": folder.as_uri(), "modelSize": "1Mi", "nodeGroups": ["cpu"],
                     "replicas": 1, "warm": {"minReplicas": 1, "maxReplicas": 1},
                     "serving": {"name": "mlp", "version": version, "traffic": traffic}},
        })  # fmt: skip

    def applied() -> dict[str, Any]:
        return cache_status(crs, "mlp-v2").get("nodeServing") or {}

    weights = {"name": "mlp", "version": "2", "traffic": 10, "mirror": 0}
    wait_for(lambda: list(applied().values()) == [weights], what="v2's weights")
    (node_name,) = applied()
    for name in ("mlp-v1", "mlp-v2"):  # placed together, and the canary warm with its name
        wait_for(lambda n=name: cache_status(crs, n)["nodeStatus"] == {node_name: "Warm"},
                 what=f"{name} warm on {node_name}")  # fmt: skip
    lmn = crs.get_cluster_custom_object(G, V, "localmodelnodes", node_name)
    assert lmn["status"]["modelStatus"]["mlp-v1"]["serving"]["traffic"] == 90
    agent = cluster["agents"][node_name]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.5] * 64}]}  # fmt: skip
    versions = set()
    for _ in range(200):
        code, answer = agent.request("POST", "/v2/models/mlp/infer", body)
        assert code == 200, answer
        versions.add(answer["model_version"])
    assert versions == {"1", "2"}

    # The weights move; each node's status catches up.
    crs.patch_cluster_custom_object(G, V, "localmodelcaches", "mlp-v2",
                                    {"spec": {"serving": {"traffic": 100}}})  # fmt: skip
    wait_for(lambda: applied()[node_name]["traffic"] == 100, what="the node applies 100")
