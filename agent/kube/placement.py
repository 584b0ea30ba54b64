"""Placement: caches + node groups + nodes + agents' reports -> what each node should hold.

Pure: ``plan(...)`` reads plain dicts (as the API server returns them) and returns the
desired LocalModelNode specs, cache and group statuses, the LocalModelNodes to delete
and the events to record. No I/O, so it is tested with dicts and benchmarked at scale.

Rules: disk copies go only to Ready nodes of the cache's groups that have room (modelSize
against the group's storageLimit and the node's reported free disk); copies already in
place stay where they are; a node that leaves (deleted, or no longer in a group) loses its
copies and others take them; a NotReady node keeps its spec (no re-download when it comes
back) but its copies do not count. Warm copies go to nodes holding a disk copy, most free
device memory first, between warm.minReplicas and warm.maxReplicas: warm.replicas (set by
hand or an HPA through /scale) if present, else raised while the reported request rate per
warm copy exceeds warm.targetRequestsPerSecond and lowered while the model is idle.

Versions (:mod:`nodecache.agent.kube.versions`): caches serving one name in one scope are
placed on the nodes that hold the name's other versions first, when they fit there; a
cache repeating a version an older one serves is not placed (DuplicateVersion). Each
version's own count above is its demand. A node splits a name's requests among the versions
warm on it, so every version taking requests (traffic or mirror above 0) is warm on the same
nodes, as many as its name's versions demand together; a version at traffic 0 keeps its
minReplicas, on those nodes first.

A pass runs in named phases over one :class:`Cluster`: observe (in
:mod:`nodecache.agent.kube.observing`: index the inputs and count the copies in place),
then per cache, oldest first, keep or place its disk copies (each cache's placement takes
room the next ones see), then per cache, biggest share of its name first, choose the warm
ones and write its status, then the node specs and group statuses.
Condition reasons live in :mod:`nodecache.agent.kube.conditions`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodecache.agent.kube.conditions import (
    CopyFacts,
    Event,
    cache_conditions,
    format_quantity,
    generation,
    group_conditions,
    transitions,
)
from nodecache.agent.kube.observing import (
    ON_DISK,
    Cluster,
    GroupedNode,
    cache_key,
    model_name,
    observe,
    to_bytes,
)
from nodecache.agent.kube.versions import Versions, warm_demand, warm_with_name

__all__ = ["FINALIZER", "Event", "Plan", "format_quantity", "plan"]

JSON = dict[str, Any]
FINALIZER = "nodecache.io/cleanup"
SCALE_SELECTOR = "app.kubernetes.io/name=nodecache-agent"
_KEEP_FIRST = {"Warm": 0, "Loading": 1, "Downloaded": 2, "Downloading": 3}  # of surplus copies


@dataclass
class Plan:
    node_specs: dict[str, list[JSON]] = field(default_factory=dict)
    cache_status: dict[tuple[str, str], JSON] = field(default_factory=dict)
    group_status: dict[str, JSON] = field(default_factory=dict)
    delete_nodes: list[str] = field(default_factory=list)
    release: list[tuple[str, str]] = field(default_factory=list)  # caches to drop FINALIZER
    events: list[Event] = field(default_factory=list)


def plan(
    caches: Iterable[JSON],
    groups: Iterable[JSON],
    nodes: Iterable[JSON],
    local_nodes: Iterable[JSON],
    *,
    now: float | None = None,
    agent_timeout: float = 120.0,
) -> Plan:
    """The whole desired state for the cluster, from what is there now.

    A node whose agent has not written a heartbeat for ``agent_timeout`` seconds reports
    nothing: its copies count as Unknown, not available.
    """
    ordered = sorted(
        caches, key=lambda c: (c["metadata"].get("creationTimestamp", ""), *cache_key(c))
    )
    cluster = observe(
        ordered, groups, nodes, local_nodes,
        now=time.time() if now is None else now, agent_timeout=agent_timeout,
    )  # fmt: skip
    # LocalModelNodes whose Node is gone are garbage; their copies move with the plan below.
    out = Plan(delete_nodes=sorted(n for n in cluster.local if n not in cluster.node_names))
    live = [c for c in ordered if not c["metadata"].get("deletionTimestamp")]
    versions = Versions.index(live)
    placements: list[_Placement] = []
    for cache in ordered:
        key = cache_key(cache)
        if cache["metadata"].get("deletionTimestamp"):
            _forget(cluster, model_name(key))
            if FINALIZER in (cache["metadata"].get("finalizers") or []):
                out.release.append(key)
        elif model_name(key) in versions.refused:
            _forget(cluster, model_name(key))
            out.cache_status[key] = _refused_status(cluster, cache, versions)
        else:
            placements.append(_place_copies(cluster, cache, versions))
    _choose_warm(cluster, placements, versions, out.cache_status)
    for cache in live:
        status = out.cache_status[cache_key(cache)]
        out.events += transitions(cache, cache.get("status") or {}, status)
    out.node_specs = _node_specs(cluster)
    out.group_status = {g: _group_status(cluster, g) for g in cluster.members}
    return out


# -- per cache ---------------------------------------------------------------------------


def _forget(cluster: Cluster, name: str) -> None:
    """A cache being deleted gives its room back; its entries leave the specs."""
    for node_name in cluster.holders.get(name, []):
        cluster.nodes[node_name].used -= cluster.sizes[name]


@dataclass
class _Placement:
    """One cache after its disk copies are placed: what its warm copies and status need."""

    cache: JSON
    name: str  # modelName
    copies: list[GroupedNode]  # disk copies on Ready nodes
    ready: int  # Ready nodes in its groups
    wanted: int  # disk copies asked for
    demand: int  # warm copies its own policy and load ask for


def _place_copies(cluster: Cluster, cache: JSON, versions: Versions) -> _Placement:
    """Keep the copies in place, add the missing ones (where the name's other versions are
    first), and work out the warm copies the cache's own policy and load ask for."""
    spec = cache["spec"]
    name = model_name(cache_key(cache))
    candidates: dict[str, GroupedNode] = {}
    for g in spec["nodeGroups"]:
        for n in cluster.members.get(g, []):
            candidates[n.name] = n
    ready = {n: info for n, info in candidates.items() if info.ready}
    wanted = spec.get("replicas")
    wanted = len(ready) if wanted is None else wanted
    copies = _keep_copies(cluster, name, spec["sourceModelUri"], candidates, wanted)
    siblings = versions.siblings(name)
    _add_copies(cluster, name, spec["sourceModelUri"], ready, copies, wanted, siblings)
    rate = sum(float((n.models.get(name) or {}).get("requestsPerSecond") or 0) for n in copies)
    last = (cache.get("status") or {}).get("warm") or {}
    demand = warm_demand(spec.get("warm") or {}, last, len(copies), rate)
    return _Placement(cache, name, copies, len(ready), wanted, demand)


def _choose_warm(
    cluster: Cluster, placements: list[_Placement], versions: Versions, out: dict[Any, JSON]
) -> None:
    """Each version's warm copies, biggest share of its name first, so that the others'
    warm copies join the nodes it chose; then each cache's status."""
    name_demand: dict[tuple[str, str], int] = {}
    for p in placements:
        slot = versions.of[p.name].slot
        name_demand[slot] = name_demand.get(slot, 0) + p.demand
    for p in sorted(placements, key=lambda p: -versions.share(p.name)):
        policy = p.cache["spec"].get("warm") or {}
        target = warm_with_name(
            p.demand,
            versions.serves(p.name),
            name_demand[versions.of[p.name].slot],
            policy,
            len(p.copies),
        )
        _mark_warm(cluster, p.name, p.copies, target, versions.siblings(p.name))
        out[cache_key(p.cache)] = _status(cluster, p, target, versions)


def _status(cluster: Cluster, p: _Placement, target: int, versions: Versions) -> JSON:
    spec, name, copies = p.cache["spec"], p.name, p.copies
    holding = {*(n.name for n in copies), *(n for n in cluster.holders.get(name, [])
                                             if name in cluster.specs[n])}  # fmt: skip
    failed = [n for n in copies if n.state(name) == "Error"]
    facts = CopyFacts(
        node_groups=spec["nodeGroups"],
        missing=[g for g in spec["nodeGroups"] if g not in cluster.groups],
        ready_nodes=p.ready,
        wanted=p.wanted,
        placed=len(copies),
        available=sum(1 for n in copies if n.state(name) in ON_DISK),
        warm=sum(1 for n in copies if n.state(name) == "Warm"),
        size=cluster.sizes[name],
        silent=sorted(n.name for n in copies if n.silent),
        failed=[(n.name, n.models.get(name, {}).get("error", "unknown error")) for n in failed],
    )
    return {
        **generation(p.cache),
        "nodeStatus": {n: cluster.nodes[n].state(name) or "Pending" for n in sorted(holding)},
        "serving": versions.status(name),
        # What each node's agent applies now: a weight change reaches every node in turn.
        "nodeServing": {
            n: serving
            for n in sorted(holding)
            if isinstance(serving := (cluster.nodes[n].models.get(name) or {}).get("serving"), dict)
        },
        "copies": {"available": facts.available, "total": facts.placed, "failed": len(failed)},
        "warm": {
            "replicas": facts.warm,
            "desired": target,
            "demand": p.demand,
            "selector": SCALE_SELECTOR,
        },
        "conditions": cache_conditions(p.cache.get("status") or {}, facts, cluster.now),
    }


def _refused_status(cluster: Cluster, cache: JSON, versions: Versions) -> JSON:
    """A cache repeating a served version: nothing placed, and a condition that says why."""
    spec = cache["spec"]
    name = model_name(cache_key(cache))
    facts = CopyFacts(
        node_groups=spec["nodeGroups"], missing=[], ready_nodes=0, wanted=0, placed=0,
        available=0, warm=0, size=cluster.sizes[name], silent=[], failed=[],
        conflict=versions.refused[name],
    )  # fmt: skip
    return {
        **generation(cache),
        "nodeStatus": {},
        "serving": versions.status(name),
        "copies": {"available": 0, "total": 0, "failed": 0},
        "warm": {"replicas": 0, "desired": 0, "demand": 0, "selector": SCALE_SELECTOR},
        "conditions": cache_conditions(cache.get("status") or {}, facts, cluster.now),
    }


def _keep_copies(
    cluster: Cluster, name: str, uri: str, candidates: dict[str, GroupedNode], wanted: int
) -> list[GroupedNode]:
    """Copies in place stay (best state first) up to ``wanted``; the rest give their room
    back. A NotReady node keeps its entry, unseen: no re-download when it returns."""
    size = cluster.sizes[name]
    holders = cluster.holders.get(name, [])
    kept: list[GroupedNode] = []
    for n in sorted(holders, key=lambda n: (_KEEP_FIRST.get(cluster.nodes[n].state(name), 9), n)):
        info = cluster.nodes[n]
        if n not in candidates or cluster.current[n][name].get("sourceModelUri") != uri:
            info.used -= size  # left the groups, or the cache was recreated elsewhere
            continue
        if info.ready and len(kept) >= wanted:
            info.used -= size  # more copies than asked for
            continue
        cluster.specs[n][name] = {"modelName": name, "sourceModelUri": uri}
        if info.ready:
            kept.append(info)
    return kept


def _add_copies(
    cluster: Cluster,
    name: str,
    uri: str,
    ready: dict[str, GroupedNode],
    copies: list[GroupedNode],
    wanted: int,
    siblings: list[str],
) -> None:
    """New copies, up to ``wanted``, on the Ready nodes that fit it: those holding the
    most of the name's other versions first, then those with the most room."""
    short = wanted - len(copies)
    if short <= 0:
        return
    size = cluster.sizes[name]
    placed = {n.name for n in copies}
    fits = (n for n in ready.values() if n.name not in placed and n.room() >= size)

    def together(n: GroupedNode) -> int:  # of the name's few versions, not the node's many models
        here, now = cluster.specs[n.name], cluster.current.get(n.name, {})
        return sum(1 for s in siblings if s in here or s in now)

    for info in heapq.nsmallest(short, fits, key=lambda n: (-together(n), -n.room(), n.name)):
        info.take(size)
        cluster.specs[info.name][name] = {"modelName": name, "sourceModelUri": uri}
        copies.append(info)


def _mark_warm(
    cluster: Cluster, name: str, copies: list[GroupedNode], target: int, siblings: list[str]
) -> None:
    """``target`` disk copies are warm: where another version of the name was just chosen
    warm first (a node splits the name's requests among its own warm versions), then where
    the name (this version or another) is warm now, then those loaded already, then most
    free device memory."""

    def chosen_for(n: GroupedNode) -> bool:
        return any(cluster.specs[n.name].get(s, {}).get("warm") for s in siblings)

    def warm_now(n: GroupedNode) -> bool:
        now = cluster.current.get(n.name, {})
        return any(now.get(m, {}).get("warm", False) for m in (name, *siblings))

    chosen = sorted(
        copies,
        key=lambda n: (
            not chosen_for(n),
            not warm_now(n),
            n.state(name) != "Warm",
            -n.device_free,
            n.name,
        ),
    )[:target]
    for info in copies:
        cluster.specs[info.name][name]["warm"] = info in chosen


# -- nodes and groups --------------------------------------------------------------------


def _node_specs(cluster: Cluster) -> dict[str, list[JSON]]:
    """Every grouped node's entries by model name; a node that left every group: none."""
    specs = {name: [cluster.specs[name][m] for m in sorted(cluster.specs[name])]
             for name in cluster.nodes}  # fmt: skip
    for name in cluster.local:
        if name in cluster.node_names and name not in cluster.nodes:
            specs[name] = []
    return specs


def _group_status(cluster: Cluster, name: str) -> JSON:
    group = cluster.groups[name]
    ready = [n for n in cluster.members[name] if n.ready]
    limit = to_bytes(group["spec"].get("storageLimit"))
    return {
        **generation(group),
        "nodes": len(ready),
        "used": format_quantity(sum(n.used for n in ready)),
        "available": format_quantity(sum(max(0, min(limit, n.budget) - n.used) for n in ready)),
        "conditions": group_conditions(group.get("status") or {}, len(ready), cluster.now),
    }
