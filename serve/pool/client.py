"""The agent's end of one worker's control socket: typed calls, each with the agent's token.

A worker's error answer becomes our own error through ``errors.CONTROL_ANSWERS``; a worker
that does not answer (restarting, dead) is ``WorkerUnavailable`` (503).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp

from nodecache.serve.errors import CONTROL_ANSWERS, WorkerUnavailable, answered
from nodecache.serve.pool.messages import (
    METRICS_ROUTE,
    STATUS_ROUTE,
    Load,
    Policy,
    Register,
    Weights,
    WorkerStatus,
    model_route,
)
from nodecache.serve.pool.policy import WorkerState
from nodecache.serve.spec import ModelPolicy, ModelSpec

__all__ = ["WorkerClient"]


class WorkerClient:
    """Control calls to one worker (whichever process serves it now)."""

    def __init__(self, state: WorkerState, control: Path, token: str) -> None:
        self.state = state
        connector = aiohttp.UnixConnector(path=str(control), limit=16)
        self._session = aiohttp.ClientSession(
            "http://worker", connector=connector, headers={"Authorization": f"Bearer {token}"}
        )

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if not self.state.up:
            raise WorkerUnavailable(f"worker {self.state.index} is restarting")
        try:
            async with self._session.request(method, path, json=body) as resp:
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkerUnavailable(f"worker {self.state.index} is not answering: {exc}") from None
        if resp.status >= 400:
            message = doc.get("error", "") if isinstance(doc, dict) else str(doc)
            raise answered(resp.status, message, CONTROL_ANSWERS)
        return doc

    async def register(self, spec: ModelSpec) -> None:
        await self._call("PUT", model_route(spec.name), Register(spec).to_json())

    async def set_policy(self, name: str, policy: ModelPolicy) -> None:
        await self._call("PUT", model_route(name, "policy"), Policy(policy).to_json())

    async def load(self, name: str, load: Load) -> None:
        await self._call("POST", model_route(name, "load"), load.to_json())

    async def unload(self, name: str) -> None:
        await self._call("POST", model_route(name, "unload"))

    async def unregister(self, name: str) -> None:
        await self._call("DELETE", model_route(name))

    async def weights(self, name: str) -> Weights:
        return Weights.from_json(await self._call("GET", model_route(name, "weights")))

    async def refresh(self) -> None:
        """Ask for the worker's status and keep it in its state. Raises aiohttp's and the
        socket's errors as they are: callers decide whether a silent worker matters."""
        asked = time.monotonic()
        async with self._session.get(STATUS_ROUTE) as resp:
            status = WorkerStatus.from_json(await resp.json())
        state = self.state
        state.models, state.refreshed_at = status.models, asked
        state.device.used = status.devices[0]["used"]
        state.requests = status.requests

    async def metrics(self) -> str:
        """The worker's serving metrics, Prometheus text."""
        async with self._session.get(METRICS_ROUTE) as resp:
            resp.raise_for_status()
            return await resp.text()
