"""What the agent asks of the cluster and what it tells it, as pure functions + one writer.

``resolve`` turns this node's LocalModelNode spec and the caches into declarations for
``NodeAgent.apply``. ``node_status`` turns ``NodeAgent.status()`` and the disk into the
LocalModelNode status. ``StatusWriter`` writes it coalesced: at most one write per
``min_interval`` however many models change, and a heartbeat when nothing does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from nodecache.agent.declarations import DeclarationError, ModelDeclaration, parse_object
from nodecache.agent.kube.api import LOCAL_MODEL_NODES, Backoff, Kube
from nodecache.agent.kube.errors import ApiError, ApiNotFound
from nodecache.serve.metrics import request_counts
from nodecache.serve.spec import ModelState

__all__ = [
    "RequestRates",
    "Resolved",
    "StatusWriter",
    "disk_capacity",
    "node_status",
    "resolve",
    "rfc3339",
]

log = logging.getLogger(__name__)
JSON = dict[str, Any]
STATUS_WRITES = Counter(
    "nodecache_kube_status_writes_total",
    "LocalModelNode status writes by this agent, by result (ok, failed).",
    ["result"],
)
STATES = frozenset(state.value for state in ModelState)


@dataclass
class Resolved:
    declarations: dict[str, ModelDeclaration]
    origins: dict[str, str]  # model -> "LocalModelCache/name" it came from
    errors: dict[str, str]  # modelName -> why it cannot be served
    complete: bool  # every entry resolved: safe to garbage-collect the disk
    access: dict[str, frozenset[str] | None] = field(default_factory=dict)
    """Model -> namespaces whose pods may call it (None: any caller)."""


def resolve(node: JSON | None, caches: dict[tuple[str, str], JSON]) -> Resolved:
    """Declarations for ``node``'s spec.localModels; ``caches`` keyed by (namespace, name).

    A ``modelName`` of ``ns/name`` names a LocalModelNamespaceCache, a bare name a
    LocalModelCache. The model answers on the socket under the cache's own name.
    Declarations come oldest cache first, the reconciler's order: of two caches serving one
    version of a name, both refuse the newer (placement leaves it off every node, but an
    edit can make two collide on a node for a pass).
    """
    out = Resolved({}, {}, {}, complete=node is not None)
    entries = ((node or {}).get("spec") or {}).get("localModels") or []
    for entry in sorted(entries, key=lambda e: _created(e["modelName"], caches)):
        model_name = entry["modelName"]
        namespace, _, name = model_name.rpartition("/")
        obj = caches.get((namespace, name))
        kind = "LocalModelNamespaceCache" if namespace else "LocalModelCache"
        if obj is None:
            out.errors[model_name] = f"{kind} {model_name} not found"
            out.complete = False
            continue
        try:
            decl = parse_object(obj)
        except DeclarationError as exc:
            out.errors[model_name] = str(exc)
            out.complete = False
            continue
        if decl.key in out.declarations:
            out.errors[model_name] = (
                f"model name {decl.key!r} is already served for {out.origins[decl.key]}"
            )
            continue
        # The reconciler says which nodes hold a warm copy; the others keep it on disk.
        out.declarations[decl.key] = replace(decl, keep_warm=entry.get("warm"))
        out.origins[decl.key] = f"{kind}/{model_name}"
        allowed = (obj.get("spec") or {}).get("allowedNamespaces")
        out.access[decl.key] = (
            frozenset([namespace]) if namespace else frozenset(allowed) if allowed else None
        )
    return out


def _created(model_name: str, caches: dict[tuple[str, str], JSON]) -> tuple[str, str, str]:
    """(creationTimestamp, namespace, name) of a modelName's cache: placement's order."""
    namespace, _, name = model_name.rpartition("/")
    meta = (caches.get((namespace, name)) or {}).get("metadata") or {}
    return meta.get("creationTimestamp") or "", namespace, name


class RequestRates:
    """Requests per second per model over about the last ``window`` seconds.

    The reconciler adds warm copies when this rate per copy exceeds the cache's target.
    """

    def __init__(
        self,
        window: float = 10.0,
        *,
        counts: Callable[[], dict[str, float]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window, self.counts, self.clock = window, counts or request_counts, clock
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def rates(self) -> dict[str, float]:
        now, counts = self.clock(), self.counts()
        self._samples.append((now, counts))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        then, before = self._samples[0]
        if now - then <= 0:
            return {}
        return {
            model: round((n - before.get(model, 0.0)) / (now - then), 1)
            for model, n in counts.items()
            if n > before.get(model, 0.0)
        }


def rfc3339(when: float | None) -> str | None:
    if not when:
        return None
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def disk_capacity(path: Path) -> JSON:
    usage = shutil.disk_usage(path)
    return {"total": usage.total, "free": usage.free}


def node_status(
    agent_status: JSON,
    *,
    disk: JSON,
    origins: dict[str, str],
    errors: dict[str, str],
    generation: int | None = None,
    rates: dict[str, float] | None = None,
) -> JSON:
    """The LocalModelNode status (without the heartbeat) from ``NodeAgent.status()``."""
    by_model_name = {
        origin.split("/", 1)[1]: model for model, origin in origins.items() if "/" in origin
    }
    agent_models = {m["name"]: m for m in agent_status.get("models", [])}
    models: JSON = {}
    for model_name, model in sorted(by_model_name.items()):
        m = agent_models.get(model)
        if m is None:
            continue
        total = m.get("bytesTotal")
        entry = {
            "state": m["state"] if m["state"] in STATES else "Unknown",
            "sourceModelUri": m.get("source"),
            "resolved": m.get("resolved"),
            "bytes": m.get("bytes") or 0,
            "bytesTotal": total,
            "progress": min(100, 100 * (m.get("bytes") or 0) // total) if total else None,
            "error": m.get("error"),
            "nextRetry": rfc3339(m.get("nextRetry")),
            "lastUsed": rfc3339(m.get("lastUsed")),
            "device": m.get("device"),
            "requestsPerSecond": (rates or {}).get(model),
            "serving": _serving(m.get("serving")),
        }
        models[model_name] = {k: v for k, v in entry.items() if v is not None}
    for model_name, error in errors.items():
        models[model_name] = {"state": ModelState.ERROR.value, "error": error}
    states = [m["state"] for m in models.values()]
    status: JSON = {
        "summary": {
            "models": len(models),
            "warm": states.count(ModelState.WARM),
            "errors": states.count(ModelState.ERROR),
        },
        "modelStatus": models,
        "capacity": {
            "disk": {**disk, "used": (agent_status.get("cache") or {}).get("usedBytes", 0)},
            "devices": [
                {k: d[k] for k in ("name", "total", "budget", "used", "free") if k in d}
                for d in agent_status.get("devices", [])
            ],
        },
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _serving(raw: Any) -> JSON | None:
    """The served name, version and weights the agent applies to a model now: the cache's
    status shows each node's, so a weight change can be watched reaching every node."""
    if not isinstance(raw, dict):
        return None
    return {k: raw[k] for k in ("name", "version", "traffic", "mirror") if k in raw}


class StatusWriter:
    """Writes ``snapshot()`` to the node's status: on change, but not more often than
    ``min_interval``; at least every ``heartbeat_interval`` as a liveness signal."""

    def __init__(
        self,
        kube: Kube,
        node_name: str,
        snapshot: Callable[[], JSON],
        *,
        min_interval: float = 10.0,
        heartbeat_interval: float = 30.0,
        poll: float = 0.5,
        agent_version: str = "",
        after_write: Callable[[JSON], Awaitable[None]] | None = None,
    ) -> None:
        self.kube = kube
        self.node_name = node_name
        self.snapshot = snapshot
        self.min_interval = min_interval
        self.heartbeat_interval = heartbeat_interval
        self.poll = poll
        self.agent_version = agent_version
        self.after_write = after_write
        """Called with each status written (the node's labels): it shares the write budget."""
        self.writes = 0
        self._last: JSON | None = None
        self._last_write = float("-inf")
        self._backoff = Backoff(base=1.0, cap=60.0)
        self.wake = asyncio.Event()

    def due(self, status: JSON, now: float) -> bool:
        """Whether ``status`` should be written at ``now`` (monotonic seconds)."""
        since = now - self._last_write
        return (status != self._last and since >= self.min_interval) or (
            since >= self.heartbeat_interval
        )

    def written(self, status: JSON, now: float) -> None:
        """Record that ``status`` reached the node's status at ``now``: what :meth:`due`
        compares the next snapshots with."""
        self._last, self._last_write = status, now

    async def run(self) -> None:
        while True:
            try:
                status = self.snapshot()
            except Exception:  # report nothing this round rather than never again
                log.exception("status snapshot failed")
                await asyncio.sleep(self.min_interval)
                continue
            now = time.monotonic()
            if self.due(status, now):
                try:
                    await self.write(status)
                    STATUS_WRITES.labels("ok").inc()
                    self._backoff.reset()
                except ApiNotFound:
                    self._last_write = now  # no LocalModelNode yet: the reconciler makes it
                except ApiError as exc:
                    STATUS_WRITES.labels("failed").inc()
                    delay = self._backoff.next()
                    log.warning(
                        "status not written; retrying",
                        extra={"error": str(exc), "retry_in": round(delay, 1)},
                    )
                    await asyncio.sleep(delay)
                    continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll)

    async def write(self, status: JSON) -> None:
        body = {
            **status,
            "heartbeat": rfc3339(time.time()),
            **({"agentVersion": self.agent_version} if self.agent_version else {}),
        }
        # JSON patch "add" replaces the whole status, so models that left are gone from it.
        await self.kube.patch(
            LOCAL_MODEL_NODES,
            self.node_name,
            [{"op": "add", "path": "/status", "value": body}],
            status=True,
        )
        self.written(status, time.monotonic())
        self.writes += 1
        if self.after_write is not None:
            await self.after_write(status)
