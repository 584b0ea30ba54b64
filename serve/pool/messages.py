"""The control protocol between the agent's pool and its workers, written once for both ends.

Each call is a typed message with ``to_json``/``from_json``; the pool sends them over the
worker's token-guarded control socket (``serve.pool.client``), the worker's control app
(``serve.worker``) reads them back. The routes and the token's variable live here too, so
neither end spells a key or a path of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nodecache.serve.spec import ModelPolicy, ModelSpec

__all__ = [
    "CONTROL",
    "METRICS_ROUTE",
    "STATUS_ROUTE",
    "TOKEN_ENV",
    "Load",
    "Policy",
    "Register",
    "Weights",
    "WorkerStatus",
    "model_route",
]

JSON = dict[str, Any]

CONTROL = "/nodecache/v1/worker"
"""Prefix of every control route (on the control socket only, never the data socket)."""
TOKEN_ENV = "NODECACHE_WORKER_TOKEN"
"""The environment variable that hands a worker the agent's control token."""
STATUS_ROUTE = CONTROL + "/status"
METRICS_ROUTE = CONTROL + "/metrics"


def model_route(name: str, verb: str = "") -> str:
    """``/nodecache/v1/worker/models/NAME[/VERB]``: register (PUT), unregister (DELETE),
    and the verbs ``policy``, ``load``, ``unload``, ``weights``."""
    # A namespaced model's name holds a "/": quoted, it stays one path segment.
    return f"{CONTROL}/models/{quote(name, safe='{}')}" + (f"/{verb}" if verb else "")


def _batching_to_json(batching: tuple[int, float] | None) -> list[float] | None:
    return list(batching) if batching else None


def _batching_from_json(raw: Any) -> tuple[int, float] | None:
    return (int(raw[0]), float(raw[1])) if raw else None


@dataclass(frozen=True)
class Register:
    """PUT ``model_route(name)``: serve this model (the name travels in the route)."""

    spec: ModelSpec

    def to_json(self) -> JSON:
        spec = self.spec
        return {
            "path": str(spec.path),
            "format": spec.format,
            "entrypoint": spec.entrypoint,
            "pinned": spec.pinned,
            "idleTimeout": spec.idle_timeout,
            "sizeHint": spec.size_hint,
            "batching": _batching_to_json(spec.batching),
            "onDemand": spec.on_demand,
            "servedName": spec.served_name,
            "version": spec.version,
        }

    @classmethod
    def from_json(cls, name: str, doc: JSON) -> Register:
        return cls(
            ModelSpec(
                name,
                Path(doc["path"]),
                doc["format"],
                entrypoint=doc.get("entrypoint"),
                pinned=bool(doc.get("pinned", False)),
                idle_timeout=doc.get("idleTimeout"),
                size_hint=doc.get("sizeHint"),
                batching=_batching_from_json(doc.get("batching")),
                on_demand=bool(doc.get("onDemand", True)),
                served_name=doc.get("servedName"),
                version=str(doc.get("version", "1")),
            )
        )


@dataclass(frozen=True)
class Policy:
    """PUT ``model_route(name, "policy")``: keep the model warm this way from now on."""

    policy: ModelPolicy

    def to_json(self) -> JSON:
        policy = self.policy
        return {
            "pinned": policy.pinned,
            "idleTimeout": policy.idle_timeout,
            "batching": _batching_to_json(policy.batching),
            "servedName": policy.served_name,
            "version": policy.version,
        }

    @classmethod
    def from_json(cls, doc: JSON) -> Policy:
        return cls(
            ModelPolicy(
                bool(doc["pinned"]),
                doc.get("idleTimeout"),
                _batching_from_json(doc.get("batching")),
                doc.get("servedName"),
                str(doc.get("version", "1")),
            )
        )


@dataclass(frozen=True)
class Load:
    """POST ``model_route(name, "load")``: make the model warm; evicting others only with
    ``evict``; from ``weights`` another worker on the same GPU exported, if given."""

    evict: bool = True
    weights: JSON | None = None

    def to_json(self) -> JSON:
        return {"evict": self.evict, "weights": self.weights}

    @classmethod
    def from_json(cls, doc: JSON) -> Load:
        return cls(bool(doc.get("evict", True)), doc.get("weights"))


@dataclass(frozen=True)
class Weights:
    """GET ``model_route(name, "weights")``'s answer: a warm model's weights as handles, and
    how many times the worker had loaded it then (whether they are still the same later)."""

    weights: JSON
    loads: int

    def to_json(self) -> JSON:
        return {"weights": self.weights, "loads": self.loads}

    @classmethod
    def from_json(cls, doc: JSON) -> Weights:
        return cls(doc["weights"], int(doc["loads"]))


@dataclass(frozen=True)
class WorkerStatus:
    """GET ``STATUS_ROUTE``'s answer: the worker's models (``ServedModel.to_json``), its
    device, and the requests it answered per model."""

    pid: int
    models: dict[str, JSON]
    devices: list[JSON]
    requests: dict[str, float]

    def to_json(self) -> JSON:
        return {
            "pid": self.pid,
            "models": self.models,
            "devices": self.devices,
            "requests": self.requests,
        }

    @classmethod
    def from_json(cls, doc: JSON) -> WorkerStatus:
        return cls(doc["pid"], doc["models"], doc["devices"], doc.get("requests", {}))
