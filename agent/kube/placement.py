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
"""

from __future__ import annotations

import datetime
import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils.quantity import parse_quantity

__all__ = ["FINALIZER", "Event", "Plan", "cache_key", "format_quantity", "node_ready", "plan"]

JSON = dict[str, Any]
FINALIZER = "nodecache.io/cleanup"
ON_DISK = {"Downloaded", "Loading", "Warm"}
SCALE_SELECTOR = "app.kubernetes.io/name=nodecache-agent"


@dataclass
class Event:
    kind: str  # LocalModelCache, LocalModelNamespaceCache
    namespace: str
    name: str
    uid: str
    type: str  # Normal, Warning
    reason: str
    message: str


@dataclass
class Plan:
    node_specs: dict[str, list[JSON]] = field(default_factory=dict)
    cache_status: dict[tuple[str, str], JSON] = field(default_factory=dict)
    group_status: dict[str, JSON] = field(default_factory=dict)
    delete_nodes: list[str] = field(default_factory=list)
    release: list[tuple[str, str]] = field(default_factory=list)  # caches to drop FINALIZER
    events: list[Event] = field(default_factory=list)


def cache_key(obj: JSON) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def model_name(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


def node_ready(node: JSON) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    unschedulable = (node.get("spec") or {}).get("unschedulable", False)
    return bool(ready and ready.get("status") == "True") and not unschedulable


def format_quantity(n: int) -> str:
    """Bytes as the largest exact binary quantity (1536Mi, 2Gi), else plain bytes."""
    for suffix, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def _labels_match(selector: JSON, labels: JSON) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass
class _Node:
    name: str
    ready: bool
    budget: int  # the tightest storageLimit of its groups
    free: int | None  # reported free disk minus copies placed but not yet downloaded
    device_free: int  # reported free device memory, GPUs counted first
    used: int = 0
    groups: list[str] = field(default_factory=list)
    models: dict[str, JSON] = field(default_factory=dict)  # modelName -> reported status
    silent: bool = False  # no heartbeat from its agent lately

    def room(self) -> int:
        room = self.budget - self.used
        return room if self.free is None else min(room, self.free)


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
    now = time.time() if now is None else now
    nodes, caches = list(nodes), list(caches)
    out = Plan()
    groups_by_name = {g["metadata"]["name"]: g for g in groups}
    local = {n["metadata"]["name"]: n for n in local_nodes}
    members: dict[str, list[_Node]] = {name: [] for name in groups_by_name}
    infos: dict[str, _Node] = {}
    for node in nodes:
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        mine = [
            g for g, obj in groups_by_name.items()
            if _labels_match((obj.get("spec") or {}).get("nodeSelector") or {}, labels)
        ]  # fmt: skip
        if not mine:
            continue
        status = (local.get(name) or {}).get("status") or {}
        capacity = status.get("capacity") or {}
        reported = status.get("modelStatus") or {}
        silent = bool(reported) and not _recent(status.get("heartbeat"), now, agent_timeout)
        if silent:
            reported = {m: {"state": "Unknown"} for m in reported}
        devices = capacity.get("devices") or []
        gpus = [d for d in devices if str(d.get("name", "")).startswith("cuda")]
        info = _Node(
            name=name,
            ready=node_ready(node),
            budget=min(_quantity(groups_by_name[g]["spec"].get("storageLimit")) for g in mine),
            free=(capacity.get("disk") or {}).get("free"),
            device_free=sum(int(d.get("free") or 0) for d in (gpus or devices)),
            groups=mine,
            models=reported,
            silent=silent,
        )
        infos[name] = info
        for g in mine:
            members[g].append(info)
    # LocalModelNodes whose Node is gone are garbage; their copies move with the plan below.
    node_names = {n["metadata"]["name"] for n in nodes}
    out.delete_nodes = sorted(n for n in local if n not in node_names)

    current: dict[str, dict[str, JSON]] = {
        name: {e["modelName"]: e for e in ((obj.get("spec") or {}).get("localModels") or [])}
        for name, obj in local.items()
        if name in infos
    }
    holders: dict[str, list[str]] = {}  # modelName -> nodes whose spec has it
    for node_name, entries in current.items():
        for m in entries:
            holders.setdefault(m, []).append(node_name)
    specs: dict[str, dict[str, JSON]] = {name: {} for name in infos}
    ordered = sorted(
        caches, key=lambda c: (c["metadata"].get("creationTimestamp", ""), *cache_key(c))
    )
    # Copies already in place count against room before anything new is placed.
    sizes = {model_name(cache_key(c)): _quantity(c["spec"].get("modelSize")) for c in ordered}
    for name, entries in current.items():
        info = infos[name]
        for m in entries:
            if m in sizes:
                info.used += sizes[m]
                if info.free is not None and info.models.get(m, {}).get("state") not in ON_DISK:
                    info.free -= sizes[m]
    for cache in ordered:
        key = cache_key(cache)
        name = model_name(key)
        if cache["metadata"].get("deletionTimestamp"):
            for node_name in holders.get(name, []):
                infos[node_name].used -= sizes[name]
            if FINALIZER in (cache["metadata"].get("finalizers") or []):
                out.release.append(key)
            continue
        status = _place(
            cache, name, sizes[name], groups_by_name, members, current,
            holders.get(name, []), infos, specs, now,
        )  # fmt: skip
        old = cache.get("status") or {}
        out.cache_status[key] = status
        out.events += _transitions(cache, old, status)
    for node_name in infos:
        out.node_specs[node_name] = [specs[node_name][m] for m in sorted(specs[node_name])]
    for node_name in local:  # a node that left every group keeps nothing
        if node_name in node_names and node_name not in infos:
            out.node_specs[node_name] = []
    for g, nodes_of in members.items():
        ready = [n for n in nodes_of if n.ready]
        limit = _quantity(groups_by_name[g]["spec"].get("storageLimit"))
        used = sum(n.used for n in ready)
        old = groups_by_name[g].get("status") or {}
        out.group_status[g] = {
            **_generation(groups_by_name[g]),
            "nodes": len(ready),
            "used": format_quantity(used),
            "available": format_quantity(sum(max(0, min(limit, n.budget) - n.used) for n in ready)),
            "conditions": [_condition(old, "Ready", bool(ready),
                                      "NodesReady" if ready else "NoReadyNodes",
                                      f"{len(ready)} Ready node(s) match the nodeSelector"
                                      if ready else "no Ready node matches the nodeSelector", now)],
        }  # fmt: skip
    return out


def _recent(heartbeat: str | None, now: float, timeout: float) -> bool:
    if not heartbeat:
        return False
    try:
        then = datetime.datetime.strptime(heartbeat[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return now - then.replace(tzinfo=datetime.UTC).timestamp() <= timeout


def _quantity(value: Any) -> int:
    if value is None:
        return 0
    return int(parse_quantity(value))


def _place(
    cache: JSON,
    name: str,
    size: int,
    groups: dict[str, JSON],
    members: dict[str, list[_Node]],
    current: dict[str, dict[str, JSON]],
    holders: list[str],
    infos: dict[str, _Node],
    specs: dict[str, dict[str, JSON]],
    now: float,
) -> JSON:
    spec = cache["spec"]
    uri = spec["sourceModelUri"]
    missing = [g for g in spec["nodeGroups"] if g not in groups]
    candidates: dict[str, _Node] = {}
    for g in spec["nodeGroups"]:
        for n in members.get(g, []):
            candidates[n.name] = n
    ready = {n: info for n, info in candidates.items() if info.ready}
    wanted = spec.get("replicas")
    wanted = len(ready) if wanted is None else wanted

    # Keep copies that are in place (best state first); NotReady nodes keep theirs unseen.
    kept: list[_Node] = []
    rank = {"Warm": 0, "Loading": 1, "Downloaded": 2, "Downloading": 3}
    for n in sorted(holders, key=lambda n: (rank.get(_state(infos[n], name), 9), n)):
        info = infos[n]
        if n not in candidates or current[n][name].get("sourceModelUri") != uri:
            info.used -= size  # left the groups, or the cache was recreated elsewhere
            continue
        if info.ready and len(kept) >= wanted:
            info.used -= size  # more copies than asked for
            continue
        specs[n][name] = {"modelName": name, "sourceModelUri": uri}
        if info.ready:
            kept.append(info)
    short = wanted - len(kept)
    placed = {n.name for n in kept}
    if short > 0:
        fits = (n for n in ready.values() if n.name not in placed and n.room() >= size)
        for info in heapq.nsmallest(short, fits, key=lambda n: (-n.room(), n.name)):
            info.used += size
            if info.free is not None:
                info.free -= size
            specs[info.name][name] = {"modelName": name, "sourceModelUri": uri}
            kept.append(info)
    copies = kept

    # Warm copies among the disk copies.
    warm_policy = spec.get("warm") or {}
    target = _warm_target(cache, warm_policy, copies, name)
    chosen = sorted(
        copies,
        key=lambda n: (
            not current.get(n.name, {}).get(name, {}).get("warm", False),
            _state(n, name) != "Warm",
            -n.device_free,
            n.name,
        ),
    )[:target]
    for info in copies:
        specs[info.name][name]["warm"] = info in chosen

    # Status, with reasons a person can act on.
    on = sorted({*(n.name for n in copies), *(n for n in holders if name in specs[n])})
    states = {n: _state(infos[n], name) or "Pending" for n in on}
    available = sum(1 for n in copies if _state(n, name) in ON_DISK)
    failed = [n for n in copies if _state(n, name) == "Error"]
    warm_now = sum(1 for n in copies if _state(n, name) == "Warm")
    old = cache.get("status") or {}
    if missing:
        ready_c = (False, "NodeGroupNotFound", f"LocalModelNodeGroup {', '.join(missing)} "
                   "does not exist; create it or fix spec.nodeGroups")  # fmt: skip
    elif not ready:
        ready_c = (False, "NoReadyNodes", f"no Ready node matches node groups "
                   f"{', '.join(spec['nodeGroups'])}; check their nodeSelector")  # fmt: skip
    elif len(copies) < wanted and len(ready) < wanted:
        ready_c = (False, "NotEnoughNodes", f"{len(copies)} of {wanted} copies placed: the "
                   f"groups have {len(ready)} Ready node(s); "
                   "add nodes or lower spec.replicas")  # fmt: skip
    elif len(copies) < wanted:
        ready_c = (False, "InsufficientCapacity", f"{len(copies)} of {wanted} copies placed: "
                   f"no other Ready node of the groups has {format_quantity(size)} free; "
                   "raise storageLimit, add nodes, or lower spec.replicas")  # fmt: skip
    elif available < len(copies) and (silent := sorted(n.name for n in copies if n.silent)):
        ready_c = (False, "AgentNotReporting", f"{available} of {len(copies)} copies known on "
                   f"disk; no recent status from the agent on {', '.join(silent[:5])}: check "
                   "the nodecache-agent pod there")  # fmt: skip
    elif available < len(copies):
        ready_c = (False, "CopiesPending", f"{available} of {len(copies)} copies on disk")
    else:
        ready_c = (True, "AllCopiesAvailable", f"{available} copies on disk, {warm_now} warm")
    degraded = bool(failed) or ready_c[1] in (
        "InsufficientCapacity", "NotEnoughNodes", "NodeGroupNotFound",
    )  # fmt: skip
    if failed:
        first = failed[0]
        error = first.models.get(name, {}).get("error", "unknown error")
        why = ("DownloadFailed", f"{len(failed)} node(s) failed, e.g. {first.name}: {error}")
    elif degraded:
        why = (ready_c[1], ready_c[2])
    else:
        why = ("AsExpected", "no node reports an error")
    progressing = available < len(copies)
    return {
        **_generation(cache),
        "nodeStatus": states,
        "copies": {"available": available, "total": len(copies), "failed": len(failed)},
        "warm": {"replicas": warm_now, "desired": target, "selector": SCALE_SELECTOR},
        "conditions": [
            _condition(old, "Ready", *ready_c, now),
            _condition(old, "Progressing", progressing,
                       "Downloading" if progressing else "Idle",
                       f"{len(copies) - available} copies on their way" if progressing
                       else "every placed copy is on disk", now),
            _condition(old, "Degraded", degraded, *why, now),
        ],
    }  # fmt: skip


def _generation(obj: JSON) -> JSON:
    """observedGeneration, left out when unknown: null is not an integer to the schema."""
    generation = obj["metadata"].get("generation")
    return {} if generation is None else {"observedGeneration": generation}


def _state(info: _Node, name: str) -> str | None:
    return (info.models.get(name) or {}).get("state")


def _warm_target(cache: JSON, policy: JSON, copies: list[_Node], name: str) -> int:
    if not policy:
        return len(copies)  # no policy: every disk copy is also warm
    low = policy.get("minReplicas", 0)
    high = policy.get("maxReplicas", len(copies))
    if "replicas" in policy:  # set by hand or by an HPA through /scale
        desired = policy["replicas"]
    else:
        desired = ((cache.get("status") or {}).get("warm") or {}).get("desired", low)
        rate = sum(float((n.models.get(name) or {}).get("requestsPerSecond") or 0) for n in copies)
        per_copy = policy.get("targetRequestsPerSecond")
        # Per copy of the *desired* count: a copy on its way already counts, so passes that
        # see the same report do not keep adding. Lower only well below target (hysteresis).
        if per_copy and rate / max(1, desired) > per_copy:
            desired += 1
        elif rate == 0 or (per_copy and desired > 1 and rate / (desired - 1) < per_copy / 2):
            desired -= 1
    return max(0, min(len(copies), max(low, min(high, desired))))


def _condition(
    old_status: JSON, kind: str, status: bool, reason: str, message: str, now: float
) -> JSON:
    text = "True" if status else "False"
    old = next((c for c in old_status.get("conditions") or [] if c.get("type") == kind), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == text and old.get("lastTransitionTime")
        else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    )
    return {"type": kind, "status": text, "reason": reason, "message": message,
            "lastTransitionTime": since}  # fmt: skip


def _transitions(cache: JSON, old: JSON, new: JSON) -> list[Event]:
    """An event when Ready flips (or is first known), for `kubectl describe`."""
    before = next((c for c in old.get("conditions") or [] if c["type"] == "Ready"), None)
    after = next(c for c in new["conditions"] if c["type"] == "Ready")
    if before and (before["status"], before.get("reason")) == (after["status"], after["reason"]):
        return []
    meta = cache["metadata"]
    return [
        Event(
            cache.get("kind", "LocalModelCache"),
            meta.get("namespace") or "",
            meta["name"],
            meta.get("uid", ""),
            "Normal" if after["status"] == "True" else "Warning",
            after["reason"],
            after["message"],
        )
    ]
