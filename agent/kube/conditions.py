"""The conditions and events placement writes: each reason, when it applies and what it tells
a person to do, in one table, so a new reason is one row and the order of the checks is
the order of the rows. Pure, like :mod:`nodecache.agent.kube.placement`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "READY_REASONS",
    "CopyFacts",
    "Event",
    "Reason",
    "cache_conditions",
    "condition",
    "format_quantity",
    "generation",
    "group_conditions",
    "transitions",
]

JSON = dict[str, Any]


@dataclass
class Event:
    kind: str  # LocalModelCache, LocalModelNamespaceCache
    namespace: str
    name: str
    uid: str
    type: str  # Normal, Warning
    reason: str
    message: str


def format_quantity(n: int) -> str:
    """Bytes as the largest exact binary quantity (1536Mi, 2Gi), else plain bytes."""
    for suffix, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


@dataclass(frozen=True)
class CopyFacts:
    """What one pass found for a cache: all its conditions are decided from this."""

    node_groups: list[str]  # spec.nodeGroups
    missing: list[str]  # of those, the groups that do not exist
    ready_nodes: int  # Ready nodes in the groups
    wanted: int  # disk copies asked for
    placed: int  # disk copies placed (on Ready nodes)
    available: int  # of those, the ones reported on disk
    warm: int  # of those, the ones reported warm
    size: int  # modelSize in bytes
    silent: list[str]  # nodes of placed copies whose agent stopped reporting
    failed: list[tuple[str, str]]  # (node, error) of placed copies in Error
    conflict: str | None = None  # why the cache is not placed at all (a repeated version)


class Reason(NamedTuple):
    """One row of the Ready condition's table; the first row that ``applies`` wins."""

    reason: str
    ready: bool
    degraded: bool  # the cache is also Degraded, for the same reason
    applies: Callable[[CopyFacts], bool]
    message: Callable[[CopyFacts], str]


READY_REASONS: tuple[Reason, ...] = (
    Reason(
        "DuplicateVersion", False, True,
        lambda f: f.conflict is not None,
        lambda f: f"not placed: {f.conflict}",
    ),
    Reason(
        "NodeGroupNotFound", False, True,
        lambda f: bool(f.missing),
        lambda f: f"LocalModelNodeGroup {', '.join(f.missing)} does not exist; create it or "
        "fix spec.nodeGroups",
    ),
    Reason(
        "NoReadyNodes", False, False,
        lambda f: not f.ready_nodes,
        lambda f: f"no Ready node matches node groups {', '.join(f.node_groups)}; check their "
        "nodeSelector",
    ),
    Reason(
        "NotEnoughNodes", False, True,
        lambda f: f.placed < f.wanted and f.ready_nodes < f.wanted,
        lambda f: f"{f.placed} of {f.wanted} copies placed: the groups have {f.ready_nodes} "
        "Ready node(s); add nodes or lower spec.replicas",
    ),
    Reason(
        "InsufficientCapacity", False, True,
        lambda f: f.placed < f.wanted,
        lambda f: f"{f.placed} of {f.wanted} copies placed: no other Ready node of the groups "
        f"has {format_quantity(f.size)} free; raise storageLimit, add nodes, or lower "
        "spec.replicas",
    ),
    Reason(
        "AgentNotReporting", False, False,
        lambda f: f.available < f.placed and bool(f.silent),
        lambda f: f"{f.available} of {f.placed} copies known on disk; no recent status from "
        f"the agent on {', '.join(f.silent[:5])}: check the nodecache-agent pod there",
    ),
    Reason(
        "CopiesPending", False, False,
        lambda f: f.available < f.placed,
        lambda f: f"{f.available} of {f.placed} copies on disk",
    ),
    Reason(
        "AllCopiesAvailable", True, False,
        lambda f: True,
        lambda f: f"{f.available} copies on disk, {f.warm} warm",
    ),
)  # fmt: skip


def cache_conditions(old_status: JSON, facts: CopyFacts, now: float) -> list[JSON]:
    """Ready (from :data:`READY_REASONS`), Progressing and Degraded for one cache."""
    row = next(r for r in READY_REASONS if r.applies(facts))
    ready_message = row.message(facts)
    degraded = bool(facts.failed) or row.degraded
    if facts.failed:
        node, error = facts.failed[0]
        why = ("DownloadFailed", f"{len(facts.failed)} node(s) failed, e.g. {node}: {error}")
    elif degraded:
        why = (row.reason, ready_message)
    else:
        why = ("AsExpected", "no node reports an error")
    on_the_way = facts.placed - facts.available
    progressing = (
        ("Downloading", f"{on_the_way} copies on their way")
        if on_the_way > 0
        else ("Idle", "every placed copy is on disk")
    )
    return [
        condition(old_status, "Ready", row.ready, row.reason, ready_message, now),
        condition(old_status, "Progressing", on_the_way > 0, *progressing, now),
        condition(old_status, "Degraded", degraded, *why, now),
    ]


def group_conditions(old_status: JSON, ready_nodes: int, now: float) -> list[JSON]:
    """A node group is Ready while at least one Ready node matches its selector."""
    if ready_nodes:
        why = ("NodesReady", f"{ready_nodes} Ready node(s) match the nodeSelector")
    else:
        why = ("NoReadyNodes", "no Ready node matches the nodeSelector")
    return [condition(old_status, "Ready", bool(ready_nodes), *why, now)]


def condition(
    old_status: JSON, kind: str, status: bool, reason: str, message: str, now: float
) -> JSON:
    """A condition whose lastTransitionTime moves only when its status does."""
    text = "True" if status else "False"
    old = next((c for c in old_status.get("conditions") or [] if c.get("type") == kind), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == text and old.get("lastTransitionTime")
        else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    )
    return {"type": kind, "status": text, "reason": reason, "message": message,
            "lastTransitionTime": since}  # fmt: skip


def generation(obj: JSON) -> JSON:
    """observedGeneration, left out when unknown: null is not an integer to the schema."""
    value = obj["metadata"].get("generation")
    return {} if value is None else {"observedGeneration": value}


def transitions(cache: JSON, old: JSON, new: JSON) -> list[Event]:
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
