"""Placement of the versions of a served name, from plain dicts: together on nodes, warm
together while they take requests, a repeated version refused with a condition."""

from __future__ import annotations

from typing import Any

from kubefake.schema import load_crds, validate_object
from test_kube_placement import GI, cache, condition, group, lmn, node, placed

from nodecache.agent.declarations import refuse_duplicate_versions
from nodecache.agent.kube.nodestatus import node_status, resolve
from nodecache.agent.kube.placement import plan
from nodecache.agent.kube.versions import warm_with_name


def version(
    name: str, served: str, ver: str, traffic: int = 100, mirror: int = 0, **spec: Any
) -> Any:
    """A cache serving ``served`` as version ``ver``."""
    serving = {"name": served, "version": ver, "traffic": traffic, "mirror": mirror}
    return cache(name, serving=serving, **spec)


def created(obj: Any, when: str) -> Any:
    obj["metadata"]["creationTimestamp"] = when
    return obj


def busy(name: str, models: dict[str, dict[str, Any]], rps: float = 1.0, free: int = 1) -> Any:
    """A node reporting ``models`` with some requests each, and ``free`` GPU bytes."""
    report = lmn(name, models, capacity={"devices": [{"name": "cuda:0", "free": free}]})
    for entry in report["status"]["modelStatus"].values():
        entry["requestsPerSecond"] = rps
    return report


def warm_nodes(p: Any, model: str) -> list[str]:
    return sorted(n for n, entries in p.node_specs.items()
                  for e in entries if e["modelName"] == model and e["warm"])  # fmt: skip


def test_a_new_version_goes_where_the_names_other_versions_are() -> None:
    roomy = {"n1": 5, "n2": 50, "n3": 20, "n4": 40}
    reports = [lmn(n, capacity={"disk": {"free": free * GI}}) for n, free in roomy.items()]
    reports[0] = lmn("n1", {"v1": {"state": "Downloaded"}}, capacity={"disk": {"free": 5 * GI}})
    reports[2] = lmn("n3", {"v1": {"state": "Warm"}}, capacity={"disk": {"free": 20 * GI}})
    nodes = [node(n) for n in roomy]
    v1 = version("v1", "fraud", "1", replicas=2)
    v2 = created(version("v2", "fraud", "2", replicas=2), "2026-01-02T00:00:00Z")
    other = created(cache("other", replicas=2), "2026-01-02T00:00:00Z")
    p = plan([v1, v2, other], [group(limit="100Gi")], nodes, reports)
    on = placed(p)
    assert [n for n in sorted(on) if "v2" in on[n]] == ["n1", "n3"], on  # with v1, not roomiest
    assert [n for n in sorted(on) if "other" in on[n]] == ["n2", "n4"], on  # the roomiest
    # Where v1's node has no room for v2, v2 goes to the next best node instead.
    reports[0] = lmn("n1", {"v1": {"state": "Downloaded"}}, capacity={"disk": {"free": 0}})
    on = placed(plan([v1, v2], [group(limit="100Gi")], nodes, reports))
    assert [n for n in sorted(on) if "v2" in on[n]] == ["n2", "n3"], on


def test_versions_taking_requests_are_warm_together_the_others_at_their_minimum() -> None:
    """Ten nodes hold both versions; the name's load asks for eight warm copies in all.
    A node splits the name's requests among the versions warm on it, so a canary warm on
    fewer nodes than its name would take less than its weight says."""
    nodes = [node(f"n{i}") for i in range(10)]

    def versions(t1: int, t2: int, mirror: int = 0) -> list[Any]:
        v1 = version("v1", "fraud", "1", traffic=t1, warm={"minReplicas": 1})
        v2 = version("v2", "fraud", "2", traffic=t2, mirror=mirror, warm={"minReplicas": 1})
        v1["status"] = {"warm": {"demand": 7}}  # their own loads' asks: 7 + 1
        v2["status"] = {"warm": {"demand": 1}}
        return [v1, v2]

    # v1 is warm on n0..n7 now; most free GPU memory is on the highest-numbered nodes.
    reports = [
        busy(f"n{i}", {"v1": {"state": "Warm" if i < 8 else "Downloaded", "warm": i < 8},
                       "v2": {"state": "Downloaded"}}, free=i)
        for i in range(10)
    ]  # fmt: skip

    def desired(p: Any) -> tuple[int, int]:
        v1, v2 = (p.cache_status[("", m)]["warm"]["desired"] for m in ("v1", "v2"))
        return v1, v2

    p = plan(versions(90, 10), [group()], nodes, reports)
    assert desired(p) == (8, 8)
    assert warm_nodes(p, "v2") == warm_nodes(p, "v1") == [f"n{i}" for i in range(8)]
    assert p.cache_status[("", "v2")]["warm"]["demand"] == 1  # its own ask, kept for next time
    p = plan(versions(0, 100), [group()], nodes, reports)
    assert desired(p) == (1, 8)  # v1 serves only pinned requests now: its minReplicas
    assert warm_nodes(p, "v2") == [f"n{i}" for i in range(8)], "where the name is warm now"
    assert set(warm_nodes(p, "v1")) <= set(warm_nodes(p, "v2"))
    assert desired(plan(versions(100, 0), [group()], nodes, reports)) == (8, 1)
    # A shadow at traffic 0 gets copies of the name's requests wherever the name is warm.
    assert desired(plan(versions(100, 0, mirror=50), [group()], nodes, reports)) == (8, 8)


def test_one_version_keeps_every_warm_copy_it_asks_for() -> None:
    """The name's only version at full traffic: exactly what its policy asks (as before)."""
    nodes = [node("n1"), node("n2"), node("n3")]
    p = plan([cache("a")], [group()], nodes, [])
    assert p.cache_status[("", "a")]["warm"]["desired"] == 3  # no policy: every copy
    pinned_only = version("a", "a", "1", traffic=0)
    p = plan([pinned_only], [group()], nodes, [])
    assert p.cache_status[("", "a")]["warm"]["desired"] == 0  # traffic 0: minReplicas only


def test_warm_with_name_clamps_and_keeps_explicit_replicas() -> None:
    assert warm_with_name(2, True, 6, {}, copies=10) == 6
    assert warm_with_name(2, False, 6, {"minReplicas": 2}, copies=10) == 2
    assert warm_with_name(9, True, 20, {"maxReplicas": 4}, copies=10) == 4
    assert warm_with_name(9, True, 20, {}, copies=3) == 3  # not more than its disk copies
    assert warm_with_name(4, True, 20, {"replicas": 4}, copies=10) == 4  # an HPA decides


def test_a_repeated_version_is_refused_with_a_condition_and_not_placed() -> None:
    older = version("fraud-v2", "fraud", "2")
    newer = created(version("fraud-v2b", "fraud", "2"), "2026-01-03T00:00:00Z")
    # The newer one was placed before it became a duplicate (its version was edited).
    reports = [lmn("n1", {"fraud-v2": {"state": "Warm"}, "fraud-v2b": {"state": "Warm"}})]
    p = plan([newer, older], [group(limit="2Gi")], [node("n1")], reports)
    assert placed(p) == {"n1": ["fraud-v2"]}
    status = p.cache_status[("", "fraud-v2b")]
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "DuplicateVersion")
    assert "already served by LocalModelCache fraud-v2" in ready["message"]
    assert "spec.serving.version" in ready["message"]
    assert condition(status, "Degraded")["status"] == "True"
    assert status["copies"] == {"available": 0, "total": 0, "failed": 0}
    assert status["nodeStatus"] == {}
    assert p.group_status["gpu"]["used"] == "1Gi"  # its room is given back
    # The older one going away lets the newer one serve.
    older["metadata"]["deletionTimestamp"] = "2026-01-04T00:00:00Z"
    p = plan([newer, older], [group()], [node("n1")], reports)
    assert placed(p) == {"n1": ["fraud-v2b"]}
    assert condition(p.cache_status[("", "fraud-v2b")], "Ready")["reason"] == "AllCopiesAvailable"


def test_scopes_never_share_versions() -> None:
    """A namespace's cache shadows the cluster's for its pods: the same version in another
    scope is no duplicate, and its share is of its own scope's versions."""
    cluster_wide = version("fraud", "fraud", "1")
    team = version("fraud", "fraud", "1", traffic=30)
    team["metadata"]["namespace"] = "team"
    other = version("fraud", "fraud", "1")
    other["metadata"]["namespace"] = "other"
    p = plan([cluster_wide, team, other], [group()], [node("n1")], [])
    assert placed(p) == {"n1": ["fraud", "other/fraud", "team/fraud"]}
    for key in (("", "fraud"), ("team", "fraud"), ("other", "fraud")):
        assert p.cache_status[key]["serving"]["share"] == 100
        assert condition(p.cache_status[key], "Ready")["reason"] != "DuplicateVersion"


def test_status_reports_the_version_its_share_and_what_each_node_applies() -> None:
    v1 = version("fraud-v1", "fraud", "1", traffic=90)
    v2 = version("fraud-v2", "fraud", "2", traffic=10)
    reports = [lmn("n1", {"fraud-v1": {"state": "Warm"}, "fraud-v2": {"state": "Warm"}})]
    applied = {"name": "fraud", "version": "2", "traffic": 50, "mirror": 0}  # not yet updated
    reports[0]["status"]["modelStatus"]["fraud-v2"]["serving"] = applied
    p = plan([v1, v2], [group()], [node("n1")], reports)
    status = p.cache_status[("", "fraud-v2")]
    assert status["serving"] == {"name": "fraud", "version": "2", "traffic": 10, "mirror": 0,
                                 "share": 10, "versions": ["1", "2"]}  # fmt: skip
    assert status["nodeServing"] == {"n1": applied}
    assert p.cache_status[("", "fraud-v1")]["serving"]["share"] == 90
    # Without spec.serving: the cache's own name, version 1, all of the traffic.
    p = plan([cache("a")], [group()], [node("n1")], [])
    assert p.cache_status[("", "a")]["serving"] == {
        "name": "a", "version": "1", "traffic": 100, "mirror": 0, "share": 100,
        "versions": ["1"]}  # fmt: skip


def test_node_status_reports_the_serving_each_model_has_on_the_node() -> None:
    """The LocalModelNode shows each model's served name, version and weights as the agent
    applies them; placement copies that into each cache's status.nodeServing."""
    serving = {"name": "fraud", "version": "2", "traffic": 10, "mirror": 0, "extra": "dropped"}
    agent = {"models": [{"name": "fraud-v2", "state": "Warm", "serving": serving},
                        {"name": "old", "state": "Warm"}]}  # fmt: skip
    status = node_status(
        agent,
        disk={"total": 100, "free": 40},
        origins={"fraud-v2": "LocalModelCache/fraud-v2", "old": "LocalModelCache/old"},
        errors={},
    )
    models = status["modelStatus"]
    assert models["fraud-v2"]["serving"] == {"name": "fraud", "version": "2", "traffic": 10,
                                             "mirror": 0}  # fmt: skip
    assert "serving" not in models["old"]  # an agent that does not say: nothing made up
    schema = load_crds()["localmodelnodes"].schema
    assert validate_object(schema, {"status": status}) == []


def test_the_node_refuses_the_same_cache_as_placement() -> None:
    """Two caches collide on one version (an edit, for a pass before the reconciler
    unplaces one): the node keeps the older, as placement does, whatever their names."""
    older = created(version("zz-fraud", "fraud", "2"), "2026-01-01T00:00:00Z")
    newer = created(version("aa-fraud", "fraud", "2"), "2026-02-01T00:00:00Z")
    caches = {("", "zz-fraud"): older, ("", "aa-fraud"): newer}
    for obj in caches.values():
        obj["apiVersion"] = "nodecache.io/v1alpha1"  # as the API server returns them
    node_spec = {"spec": {"localModels": [
        {"modelName": m, "sourceModelUri": f"s3://bucket/{m}/"} for m in ("aa-fraud", "zz-fraud")
    ]}}  # fmt: skip
    kept, refused = refuse_duplicate_versions(resolve(node_spec, caches).declarations)
    assert list(kept) == ["zz-fraud"] and list(refused) == ["aa-fraud"]
    p = plan([newer, older], [group()], [node("n1")], [])
    assert placed(p) == {"n1": ["zz-fraud"]}
