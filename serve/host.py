"""Where the agent's models are served: in this process, or in worker processes.

The agent drives either through the same small async interface, so the control
loop does not care whether a model lives next to it or behind a worker socket.
"""

from __future__ import annotations

from typing import Any, Protocol

from nodecache.serve.repository import ModelRepository
from nodecache.serve.spec import ModelPolicy, ModelSpec

__all__ = ["LocalHost", "ModelHost"]


class ModelHost(Protocol):
    async def register(self, spec: ModelSpec) -> None:
        """Make the model answerable (it loads on demand); the same files again only
        update its policy."""

    async def load(self, name: str, *, evict: bool) -> None:
        """Make the model warm; raises a ServeError (503 NoRoom, 500 load error)."""

    async def unregister(self, name: str) -> None:
        """Stop serving the model once its in-flight requests finish."""

    async def unload(self, name: str) -> None:
        """Give back the model's memory (after in-flight requests); it stays answerable."""

    async def set_policy(self, name: str, policy: ModelPolicy) -> None:
        """Change how a registered model is kept warm; an unknown name is ignored."""

    def describe(self, name: str) -> dict[str, Any] | None:
        """The model's serving status (state, device, bytes, ...), None if not registered."""

    def names(self) -> list[str]: ...

    def devices(self) -> list[dict[str, Any]]: ...


class LocalHost:
    """Models served by a repository in the agent's own process."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    async def register(self, spec: ModelSpec) -> None:
        self.repository.register(spec)

    async def load(self, name: str, *, evict: bool) -> None:
        await self.repository.load(name, evict=evict)

    async def unregister(self, name: str) -> None:
        await self.repository.unregister(name)

    async def unload(self, name: str) -> None:
        await self.repository.unload(name)

    async def set_policy(self, name: str, policy: ModelPolicy) -> None:
        self.repository.set_policy(name, policy)

    def describe(self, name: str) -> dict[str, Any] | None:
        model = self.repository.get(name)
        return None if model is None else model.to_json()

    def names(self) -> list[str]:
        return [m.name for m in self.repository.models()]

    def devices(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.repository.devices]
