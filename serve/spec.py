"""The model contract between the agent and the serving tier, stated once.

``ModelSpec`` is what the agent asks a host to serve (in-process, or in a worker behind the
control socket), ``ModelPolicy`` the part of it that may change in place, and ``ModelState``
the states a model goes through, spelled as status reports and the Kubernetes CRDs spell them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

__all__ = ["ModelPolicy", "ModelSpec", "ModelState"]


class ModelState(StrEnum):
    """``Pending -> Downloading -> Downloaded -> Loading -> Warm``; ``Error`` from any of them.

    The agent owns the first two (and errors before a model is on disk), the serving tier
    the rest. Members are strings: they serialise as their value in status JSON."""

    PENDING = "Pending"
    DOWNLOADING = "Downloading"
    DOWNLOADED = "Downloaded"
    LOADING = "Loading"
    WARM = "Warm"
    ERROR = "Error"


@dataclass(frozen=True)
class ModelPolicy:
    """How a served model is kept warm: what a declaration can change without a reload."""

    pinned: bool = False
    """Never evicted to make room, nor unloaded when idle."""
    idle_timeout: float | None = None
    """Unloaded after this many seconds without requests (None: never)."""
    batching: tuple[int, float] | None = None
    """(max batch size, max queue delay in seconds) when dynamic batching is on."""
    served_name: str | None = None
    """The name answers carry (``model_name``); None: the model's own name."""
    version: str = "1"
    """The version answers carry (``model_version``) and the request metrics are labelled with."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its verified files on disk, how to load them, and its policy."""

    name: str
    path: Path
    format: str
    entrypoint: str | None = None
    """``module:Class`` inside the model folder (python models, torch module classes)."""
    pinned: bool = False
    idle_timeout: float | None = None
    size_hint: int | None = None
    """Bytes the model is expected to hold once loaded (None: measured from its files)."""
    batching: tuple[int, float] | None = None
    on_demand: bool = True
    """False for a pool's extra copy: once unloaded it answers 503 instead of loading itself
    again (the pool decides where copies live, and never by evicting)."""
    served_name: str | None = None
    version: str = "1"

    @property
    def served(self) -> str:
        """The name answers carry: several models (versions) may share one."""
        return self.served_name or self.name

    @property
    def policy(self) -> ModelPolicy:
        return ModelPolicy(
            self.pinned, self.idle_timeout, self.batching, self.served_name, self.version
        )

    def with_policy(self, policy: ModelPolicy) -> ModelSpec:
        return replace(
            self,
            pinned=policy.pinned,
            idle_timeout=policy.idle_timeout,
            batching=policy.batching,
            served_name=policy.served_name,
            version=policy.version,
        )

    def same_files(self, other: ModelSpec) -> bool:
        """Whether ``other`` loads the same thing (a policy change is not a new model)."""
        return (self.path, self.format, self.entrypoint) == (
            other.path,
            other.format,
            other.entrypoint,
        )

    @property
    def attachable(self) -> bool:
        """Whether another worker on the same GPU can attach to this model's weights (only
        torch module classes export them: see ``runtimes.ipc``)."""
        return self.format == "torch" and bool(self.entrypoint)
