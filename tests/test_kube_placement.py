"""Placement decisions from plain dicts: no API server, no I/O."""

from __future__ import annotations

import time
from typing import Any

from nodecache.agent.kube.conditions import READY_REASONS, CopyFacts, cache_conditions
from nodecache.agent.kube.placement import FINALIZER, format_quantity, plan

GI = 1 << 30


def node(name: str, ready: bool = True, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"pool": "gpu", **labels}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def group(name: str = "gpu", limit: str = "10Gi", **selector: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": 1},
        "spec": {"nodeSelector": selector or {"pool": "gpu"}, "storageLimit": limit},
    }


def cache(name: str, size: str = "1Gi", groups: tuple[str, ...] = ("gpu",), **spec: Any) -> Any:
    return {
        "kind": "LocalModelCache",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z", "finalizers": [FINALIZER]},
        "spec": {"sourceModelUri": f"s3://bucket/{name}/", "modelSize": size,
                 "nodeGroups": list(groups), **spec},
    }  # fmt: skip


def lmn(name: str, models: dict[str, dict[str, Any]] | None = None, **status: Any) -> Any:
    """A LocalModelNode holding ``models`` (name -> {state, warm, ...})."""
    models = models or {}
    status.setdefault("heartbeat", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return {
        "metadata": {"name": name},
        "spec": {"localModels": [
            {"modelName": m, "sourceModelUri": f"s3://bucket/{m}/", "warm": s.get("warm", False)}
            for m, s in models.items()]},
        "status": {"modelStatus": {m: {"state": s["state"]} for m, s in models.items()
                                   if "state" in s}, **status},
    }  # fmt: skip


def placed(p: Any) -> dict[str, list[str]]:
    return {n: [e["modelName"] for e in entries] for n, entries in p.node_specs.items()}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_every_ready_node_of_the_group_by_default_never_not_ready_ones() -> None:
    p = plan([cache("a")], [group()], [node("n1"), node("n2"), node("n3", ready=False),
                                       node("cpu1", pool="cpu")], [])  # fmt: skip
    assert placed(p) == {"n1": ["a"], "n2": ["a"], "n3": []}
    status = p.cache_status[("", "a")]
    assert status["copies"] == {"available": 0, "total": 2, "failed": 0}
    assert status["nodeStatus"] == {"n1": "Pending", "n2": "Pending"}
    assert condition(status, "Ready")["reason"] == "CopiesPending"
    assert condition(status, "Progressing")["status"] == "True"


def test_replicas_limits_copies_and_prefers_the_roomiest_nodes() -> None:
    nodes = [node("n1"), node("n2"), node("n3")]
    reports = [lmn("n1", capacity={"disk": {"free": 5 * GI}}),
               lmn("n2", capacity={"disk": {"free": 50 * GI}}),
               lmn("n3", capacity={"disk": {"free": 20 * GI}})]  # fmt: skip
    p = plan([cache("a", replicas=2)], [group(limit="100Gi")], nodes, reports)
    assert placed(p) == {"n1": [], "n2": ["a"], "n3": ["a"]}


def test_capacity_is_respected_and_shortfall_is_explained() -> None:
    caches = [cache("a", "6Gi"), cache("b", "6Gi")]
    p = plan(caches, [group(limit="10Gi")], [node("n1")], [])
    assert placed(p) == {"n1": ["a"]}
    b = p.cache_status[("", "b")]
    ready = condition(b, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InsufficientCapacity"
    assert "6Gi" in ready["message"] and "storageLimit" in ready["message"]
    assert condition(b, "Degraded")["status"] == "True"
    assert p.group_status["gpu"] == {
        **p.group_status["gpu"], "nodes": 1, "used": "6Gi", "available": "4Gi"}  # fmt: skip
    # Reported free disk counts too, less what is placed but not yet downloaded.
    full = [lmn("n1", capacity={"disk": {"free": 3 * GI}})]
    assert placed(plan([cache("a", "6Gi")], [group(limit="100Gi")], [node("n1")], full)) == {
        "n1": []
    }


def test_copies_stay_put_and_move_when_their_node_leaves() -> None:
    caches = [cache("a", replicas=1)]
    reports = [lmn("n2", {"a": {"state": "Warm"}}), lmn("n1")]
    p = plan(caches, [group()], [node("n1"), node("n2")], reports)
    assert placed(p) == {"n1": [], "n2": ["a"]}  # stable: n2 already has it
    assert p.cache_status[("", "a")]["copies"]["available"] == 1
    assert condition(p.cache_status[("", "a")], "Ready")["status"] == "True"
    # n2 is deleted: its LocalModelNode is garbage and n1 takes the copy.
    p = plan(caches, [group()], [node("n1")], reports)
    assert p.delete_nodes == ["n2"] and placed(p) == {"n1": ["a"]}
    # n2 leaves the group (labels changed): same.
    p = plan(caches, [group()], [node("n1"), node("n2", pool="cpu")], reports)
    assert placed(p) == {"n1": ["a"], "n2": []} and p.delete_nodes == []


def test_a_not_ready_node_keeps_its_spec_but_another_node_serves() -> None:
    reports = [lmn("n2", {"a": {"state": "Warm"}}), lmn("n1")]
    p = plan([cache("a", replicas=1)], [group()], [node("n1"), node("n2", ready=False)], reports)
    assert placed(p) == {"n1": ["a"], "n2": ["a"]}
    assert p.cache_status[("", "a")]["copies"]["total"] == 1


def test_errors_degrade_with_the_nodes_reason() -> None:
    reports = [lmn("n1", {"a": {"state": "Error"}})]
    reports[0]["status"]["modelStatus"]["a"]["error"] = "403 Forbidden from s3"
    p = plan([cache("a")], [group()], [node("n1")], reports)
    degraded = condition(p.cache_status[("", "a")], "Degraded")
    assert degraded["reason"] == "DownloadFailed" and "n1: 403 Forbidden" in degraded["message"]
    assert p.cache_status[("", "a")]["copies"]["failed"] == 1


def test_missing_group_and_no_nodes_say_what_to_fix() -> None:
    p = plan([cache("a", groups=("nope",))], [group()], [node("n1")], [])
    assert condition(p.cache_status[("", "a")], "Ready")["reason"] == "NodeGroupNotFound"
    p = plan([cache("a")], [group()], [node("n1", ready=False)], [])
    assert "nodeSelector" in condition(p.cache_status[("", "a")], "Ready")["message"]


def test_warm_copies_between_min_and_max_by_device_memory_and_load() -> None:
    def report(name: str, free: int, rps: float) -> Any:
        r = lmn(name, {"a": {"state": "Downloaded"}},
                capacity={"devices": [{"name": "cuda:0", "free": free}]})  # fmt: skip
        r["status"]["modelStatus"]["a"]["requestsPerSecond"] = rps
        return r

    policy = {"minReplicas": 1, "maxReplicas": 2, "targetRequestsPerSecond": 10}
    nodes = [node("n1"), node("n2"), node("n3")]
    idle = [report("n1", 1, 0), report("n2", 9, 0), report("n3", 5, 0)]
    p = plan([cache("a", warm=policy)], [group()], nodes, idle)
    warm = {n: e[0]["warm"] for n, e in p.node_specs.items()}
    assert warm == {"n1": False, "n2": True, "n3": False}  # most free GPU memory
    busy = [report("n1", 1, 30), report("n2", 9, 30), report("n3", 5, 30)]
    a = cache("a", warm=policy)
    a["status"] = {"warm": {"desired": 1}}
    p = plan([a], [group()], nodes, busy)
    assert p.cache_status[("", "a")]["warm"]["desired"] == 2
    a["status"] = {"warm": {"desired": 2}}
    assert plan([a], [group()], nodes, busy).cache_status[("", "a")]["warm"]["desired"] == 2
    assert plan([a], [group()], nodes, idle).cache_status[("", "a")]["warm"]["desired"] == 1
    # Light load keeps two copies (hysteresis); well below half the target drops one.
    light = [report("n1", 1, 4), report("n2", 9, 4), report("n3", 5, 4)]  # 12 rps in all
    assert plan([a], [group()], nodes, light).cache_status[("", "a")]["warm"]["desired"] == 2
    lighter = [report("n1", 1, 1), report("n2", 9, 1), report("n3", 5, 1)]  # 3 rps
    assert plan([a], [group()], nodes, lighter).cache_status[("", "a")]["warm"]["desired"] == 1
    # The scale subresource (an HPA) decides instead, clamped to min..max.
    scaled = cache("a", warm={**policy, "replicas": 5})
    assert plan([scaled], [group()], nodes, idle).cache_status[("", "a")]["warm"]["desired"] == 2


def test_deleting_a_cache_unplaces_it_and_releases_the_finalizer() -> None:
    a = cache("a")
    a["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    p = plan([a, cache("b")], [group()], [node("n1")], [lmn("n1", {"a": {"state": "Warm"}})])
    assert placed(p) == {"n1": ["b"]} and p.release == [("", "a")]
    assert ("", "a") not in p.cache_status


def test_namespaced_caches_are_named_namespace_slash_name() -> None:
    a = cache("a")
    a["metadata"]["namespace"] = "team"
    p = plan([a], [group()], [node("n1")], [])
    assert placed(p) == {"n1": ["team/a"]} and ("team", "a") in p.cache_status


def test_ready_events_on_transitions_only() -> None:
    p = plan([cache("a")], [group()], [node("n1")], [lmn("n1", {"a": {"state": "Warm"}})])
    (event,) = p.events
    assert (event.reason, event.type) == ("AllCopiesAvailable", "Normal")
    again = cache("a")
    again["status"] = p.cache_status[("", "a")]
    assert (
        plan([again], [group()], [node("n1")], [lmn("n1", {"a": {"state": "Warm"}})]).events == []
    )


def test_format_quantity() -> None:
    assert [format_quantity(n) for n in (0, 1536 << 20, 2 * GI, 1000)] == [
        "0", "1536Mi", "2Gi", "1000"]  # fmt: skip


def test_placement_at_scale_is_computed() -> None:
    """500 nodes x 200 caches here; docs/KUBERNETES.md has the 5,000 x 2,000 numbers."""
    nodes = [node(f"n{i}", rack=str(i % 10)) for i in range(500)]
    groups = [group(f"g{r}", "2Ti", rack=str(r)) for r in range(10)]
    caches = [cache(f"c{i}", "10Gi", (f"g{i % 10}",), replicas=3) for i in range(200)]
    p = plan(caches, groups, nodes, [])
    assert sum(len(v) for v in p.node_specs.values()) == 600
    assert all(s["copies"]["total"] == 3 for s in p.cache_status.values())


def test_a_silent_agent_counts_as_unknown_and_says_where_to_look() -> None:
    now = 1_800_000_000.0
    beat = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 30))
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 600))
    reports = [lmn("n1", {"a": {"state": "Warm"}}, heartbeat=beat),
               lmn("n2", {"a": {"state": "Warm"}}, heartbeat=old)]  # fmt: skip
    p = plan([cache("a")], [group()], [node("n1"), node("n2")], reports, now=now)
    status = p.cache_status[("", "a")]
    assert status["nodeStatus"] == {"n1": "Warm", "n2": "Unknown"}
    assert status["copies"]["available"] == 1
    ready = condition(status, "Ready")
    assert ready["reason"] == "AgentNotReporting" and "on n2" in ready["message"]


def test_more_replicas_than_nodes_says_so() -> None:
    p = plan([cache("a", replicas=3)], [group()], [node("n1"), node("n2")], [])
    ready = condition(p.cache_status[("", "a")], "Ready")
    assert ready["reason"] == "NotEnoughNodes" and "2 Ready node(s)" in ready["message"]


def test_each_ready_reason_is_the_first_row_that_applies() -> None:
    """The Ready table, row by row, from plain facts: the earlier rows win."""
    base = CopyFacts(node_groups=["gpu"], missing=[], ready_nodes=3, wanted=2, placed=2,
                     available=2, warm=1, size=GI, silent=[], failed=[])  # fmt: skip
    cases = {
        "DuplicateVersion": {"conflict": "version '2' of 'fraud' is already served by ..."},
        "NodeGroupNotFound": {"missing": ["cpu"], "ready_nodes": 0},
        "NoReadyNodes": {"ready_nodes": 0, "placed": 0},
        "NotEnoughNodes": {"wanted": 5, "placed": 3},
        "InsufficientCapacity": {"placed": 1},
        "AgentNotReporting": {"available": 1, "silent": ["n2"]},
        "CopiesPending": {"available": 1},
        "AllCopiesAvailable": {},
    }
    assert list(cases) == [r.reason for r in READY_REASONS]
    for reason, changes in cases.items():
        facts = CopyFacts(**{**base.__dict__, **changes})
        ready, progressing, degraded = cache_conditions({}, facts, now=0.0)
        assert ready["reason"] == reason
        assert ready["status"] == ("True" if reason == "AllCopiesAvailable" else "False")
        row = next(r for r in READY_REASONS if r.reason == reason)
        assert degraded["status"] == str(row.degraded)
        assert progressing["status"] == str(facts.available < facts.placed)
    failed = CopyFacts(**{**base.__dict__, "failed": [("n1", "403"), ("n2", "404")]})
    degraded = cache_conditions({}, failed, now=0.0)[2]
    assert (degraded["reason"], degraded["message"]) == (
        "DownloadFailed", "2 node(s) failed, e.g. n1: 403")  # fmt: skip
