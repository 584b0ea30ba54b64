"""Observe, the first phase of a placement pass: index the inputs into one :class:`Cluster`.

Pure, like :mod:`nodecache.agent.kube.placement`, which runs the phases after it. Every
grouped node is read once, as its agent last reported it, and the copies already in its
spec take their room before anything new is placed.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils.quantity import parse_quantity

__all__ = [
    "ON_DISK",
    "Cluster",
    "GroupedNode",
    "cache_key",
    "model_name",
    "node_ready",
    "observe",
    "to_bytes",
]

JSON = dict[str, Any]
ON_DISK = {"Downloaded", "Loading", "Warm"}


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


@dataclass
class GroupedNode:
    """A node in at least one group, as this pass sees it: its room and its reports."""

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

    def state(self, model: str) -> str | None:
        return (self.models.get(model) or {}).get("state")

    def take(self, size: int) -> None:
        """A new copy is placed here: it takes room, and disk until it is downloaded."""
        self.used += size
        if self.free is not None:
            self.free -= size


@dataclass
class Cluster:
    """One pass's view of the cluster. The per-cache phases take room on ``nodes`` and
    write ``specs``, in cache order: that running account is the pass's only state."""

    now: float
    groups: dict[str, JSON]  # name -> LocalModelNodeGroup
    members: dict[str, list[GroupedNode]]  # group -> its nodes
    nodes: dict[str, GroupedNode]  # nodes in at least one group
    local: dict[str, JSON]  # name -> LocalModelNode
    node_names: set[str]  # every Node that exists
    current: dict[str, dict[str, JSON]]  # node -> modelName -> its spec entry now
    holders: dict[str, list[str]]  # modelName -> nodes whose spec has it now
    sizes: dict[str, int]  # modelName -> modelSize in bytes
    specs: dict[str, dict[str, JSON]]  # node -> modelName -> its spec entry to be


def observe(
    caches: Iterable[JSON],
    groups: Iterable[JSON],
    nodes: Iterable[JSON],
    local_nodes: Iterable[JSON],
    *,
    now: float,
    agent_timeout: float,
) -> Cluster:
    """Index the inputs; copies already in place count against room before anything new."""
    nodes = list(nodes)
    by_name = {g["metadata"]["name"]: g for g in groups}
    local = {n["metadata"]["name"]: n for n in local_nodes}
    members: dict[str, list[GroupedNode]] = {name: [] for name in by_name}
    infos: dict[str, GroupedNode] = {}
    for node in nodes:
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        mine = [
            g for g, obj in by_name.items()
            if _labels_match((obj.get("spec") or {}).get("nodeSelector") or {}, labels)
        ]  # fmt: skip
        if not mine:
            continue
        status = (local.get(name) or {}).get("status") or {}
        infos[name] = _read_node(node, mine, by_name, status, now, agent_timeout)
        for g in mine:
            members[g].append(infos[name])
    current = {
        name: {e["modelName"]: e for e in ((obj.get("spec") or {}).get("localModels") or [])}
        for name, obj in local.items()
        if name in infos
    }
    holders: dict[str, list[str]] = {}
    for node_name, entries in current.items():
        for m in entries:
            holders.setdefault(m, []).append(node_name)
    cluster = Cluster(
        now=now, groups=by_name, members=members, nodes=infos, local=local,
        node_names={n["metadata"]["name"] for n in nodes}, current=current, holders=holders,
        sizes={model_name(cache_key(c)): to_bytes(c["spec"].get("modelSize")) for c in caches},
        specs={name: {} for name in infos},
    )  # fmt: skip
    _count_in_place(cluster)
    return cluster


def _read_node(
    node: JSON, mine: list[str], groups: dict[str, JSON], status: JSON, now: float, timeout: float
) -> GroupedNode:
    """A node of ``mine`` groups as its agent last reported it (all Unknown if silent)."""
    capacity = status.get("capacity") or {}
    reported = status.get("modelStatus") or {}
    silent = bool(reported) and not _recent(status.get("heartbeat"), now, timeout)
    if silent:
        reported = {m: {"state": "Unknown"} for m in reported}
    devices = capacity.get("devices") or []
    gpus = [d for d in devices if str(d.get("name", "")).startswith("cuda")]
    return GroupedNode(
        name=node["metadata"]["name"],
        ready=node_ready(node),
        budget=min(to_bytes(groups[g]["spec"].get("storageLimit")) for g in mine),
        free=(capacity.get("disk") or {}).get("free"),
        device_free=sum(int(d.get("free") or 0) for d in (gpus or devices)),
        groups=mine,
        models=reported,
        silent=silent,
    )


def _count_in_place(cluster: Cluster) -> None:
    """Copies in the specs now take room; those not yet on disk also take free disk."""
    for name, entries in cluster.current.items():
        info = cluster.nodes[name]
        for m in entries:
            if m in cluster.sizes:
                info.used += cluster.sizes[m]
                if info.free is not None and info.models.get(m, {}).get("state") not in ON_DISK:
                    info.free -= cluster.sizes[m]


def _labels_match(selector: JSON, labels: JSON) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _recent(heartbeat: str | None, now: float, timeout: float) -> bool:
    if not heartbeat:
        return False
    try:
        then = datetime.datetime.strptime(heartbeat[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return now - then.replace(tzinfo=datetime.UTC).timestamp() <= timeout


def to_bytes(value: Any) -> int:
    """A Kubernetes quantity (``100Gi``) in bytes; none is 0."""
    if value is None:
        return 0
    return int(parse_quantity(value))
