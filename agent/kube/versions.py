"""Versions of a served name, and the warm copies each version asks for, as placement
sees them.

Several caches may serve one name (``spec.serving.name``) in one scope (a namespace, or the
cluster), each as a version with a traffic weight and a mirror percent. Placement needs
three things from that, all decided here from plain dicts: which caches repeat a version
an older cache already serves (refused: a CRD cannot see across objects), which caches are
the other versions of a name (placed on the same nodes), and each version's share of the
name's requests. Pure, like :mod:`placement`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Version", "Versions", "version_of", "warm_demand", "warm_with_name"]

JSON = dict[str, Any]
DEFAULT_VERSION = "1"
DEFAULT_TRAFFIC = 100


@dataclass(frozen=True)
class Version:
    """One cache as a version of its served name."""

    model: str  # modelName on the nodes: name, or namespace/name for a namespaced cache
    scope: str  # the namespace; "" for a cluster cache
    name: str  # the served name
    version: str
    traffic: int  # weight among the name's versions for unpinned requests
    mirror: int  # percent of the name's unpinned requests copied here

    @property
    def slot(self) -> tuple[str, str]:
        """What versions of one name share: a namespaced cache never joins a cluster one."""
        return self.scope, self.name


def version_of(cache: JSON) -> Version:
    """The cache's serving, with the defaults the API server and the parser fill in."""
    meta = cache["metadata"]
    scope, name = meta.get("namespace") or "", meta["name"]
    raw = (cache.get("spec") or {}).get("serving")
    raw = raw if isinstance(raw, dict) else {}
    served = raw.get("name")
    version = raw.get("version")
    return Version(
        model=f"{scope}/{name}" if scope else name,
        scope=scope,
        name=served if isinstance(served, str) and served else name,
        version=version if isinstance(version, str) and version else DEFAULT_VERSION,
        traffic=_count(raw.get("traffic"), DEFAULT_TRAFFIC),
        mirror=_count(raw.get("mirror"), 0),
    )


def _count(value: Any, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
    )


@dataclass
class Versions:
    """The versions of every served name in one pass."""

    of: dict[str, Version] = field(default_factory=dict)  # model -> its version
    served: dict[tuple[str, str], list[Version]] = field(default_factory=dict)
    """(scope, served name) -> the versions served, oldest cache first; no refused one."""
    refused: dict[str, str] = field(default_factory=dict)  # model -> why it is not placed

    @classmethod
    def index(cls, caches: Iterable[JSON]) -> Versions:
        """``caches`` oldest first, live ones only: of two caches with one (scope, name,
        version), the older keeps serving and the newer is refused, whichever the nodes
        saw first, so that a new object can never take a version from one in use."""
        out = cls()
        for cache in caches:
            v = version_of(cache)
            out.of[v.model] = v
            versions = out.served.setdefault(v.slot, [])
            holder = next((o for o in versions if o.version == v.version), None)
            if holder is None:
                versions.append(v)
                continue
            where = f"namespace {v.scope}" if v.scope else "the cluster scope"
            out.refused[v.model] = (
                f"version {v.version!r} of {v.name!r} is already served by "
                f"{_kind(holder)} {holder.model} in {where}; give this cache another "
                "spec.serving.version (or spec.serving.name)"
            )
        return out

    def siblings(self, model: str) -> list[str]:
        """The models of the name's other versions."""
        v = self.of[model]
        return [o.model for o in self.served.get(v.slot, []) if o.model != model]

    def share(self, model: str) -> float:
        """The fraction of the name's requests this version handles: its weight among the
        name's weights, plus the copies it receives as a mirror."""
        return self._traffic_share(model) + self.of[model].mirror / 100

    def serves(self, model: str) -> bool:
        """Whether the version takes requests that name no version (or copies of them)."""
        return self.share(model) > 0

    def _traffic_share(self, model: str) -> float:
        v = self.of[model]
        total = sum(o.traffic for o in self.served.get(v.slot, []))
        return v.traffic / total if total and model not in self.refused else 0.0

    def status(self, model: str) -> JSON:
        """``status.serving`` of the cache."""
        v = self.of[model]
        return {
            "name": v.name,
            "version": v.version,
            "traffic": v.traffic,
            "mirror": v.mirror,
            "share": round(100 * self._traffic_share(model)),
            "versions": sorted(o.version for o in self.served.get(v.slot, [])),
        }


def _kind(v: Version) -> str:
    return "LocalModelNamespaceCache" if v.scope else "LocalModelCache"


def warm_with_name(demand: int, serves: bool, name_demand: int, policy: JSON, copies: int) -> int:
    """A version's warm copies. A node routes a name's unpinned requests among the versions
    warm *on that node* (warm ones first, so that a version still loading takes none), so a
    version that takes requests (``serves``: traffic or mirror above 0) must be warm wherever
    its name is, or its share is silently lost on the other nodes: it gets the warm copies
    its whole name asks for (``name_demand``, the sum of its versions' own demands, as
    the name's load is the sum of theirs). A version at traffic 0 serves only pinned
    requests: its minReplicas. A count set through warm.replicas (by hand or an HPA) is
    kept as asked. The name's only version gets exactly its own ``demand``, as before."""
    if "replicas" in policy:
        return demand
    low = policy.get("minReplicas", 0)
    high = policy.get("maxReplicas", copies)
    wanted = name_demand if serves else 0
    return max(0, min(copies, max(low, min(high, wanted))))


def warm_demand(policy: JSON, last: JSON, copies: int, rate: float) -> int:
    """The warm copies a cache's own policy and load ask for, of its ``copies`` disk copies:
    every one without a policy; warm.replicas (by hand or an HPA through /scale) if set;
    else the last demand (``last`` is status.warm), raised while the request ``rate`` per
    copy exceeds warm.targetRequestsPerSecond and lowered while idle; within min..max.
    The last *demand*, not the last desired count, so that a name's shares never feed back."""
    if not policy:
        return copies
    low = policy.get("minReplicas", 0)
    high = policy.get("maxReplicas", copies)
    if "replicas" in policy:
        desired = policy["replicas"]
    else:
        desired = last.get("demand", last.get("desired", low))
        per_copy = policy.get("targetRequestsPerSecond")
        # Per copy of the *desired* count: a copy on its way already counts, so passes that
        # see the same report do not keep adding. Lower only well below target (hysteresis).
        if per_copy and rate / max(1, desired) > per_copy:
            desired += 1
        elif rate == 0 or (per_copy and desired > 1 and rate / (desired - 1) < per_copy / 2):
            desired -= 1
    return max(0, min(copies, max(low, min(high, desired))))
