"""Which models this server can answer for, and their life in memory.

The agent registers a model once its files are verified on disk; the repository
loads it on demand (one load however many requests wait for it), counts the
requests using it, and unloads it only after those requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from serve.errors import ModelLoadError, ModelNotFound, ServerOverloaded
from serve.runtimes import Runtime, load_runtime

__all__ = ["ModelRepository", "ServedModel", "State"]

log = logging.getLogger(__name__)


class State:
    DOWNLOADED = "Downloaded"
    LOADING = "Loading"
    WARM = "Warm"
    ERROR = "Error"


@dataclass
class ServedModel:
    name: str
    path: Path
    format: str
    state: str = State.DOWNLOADED
    runtime: Runtime | None = None
    error: str | None = None
    inflight: int = 0
    last_used: float | None = None
    load_seconds: float | None = None
    device: str | None = None
    _load: asyncio.Task[Runtime] | None = field(default=None, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()


class ModelRepository:
    """Registered models by name; loads are shared, unloads wait for readers."""

    def __init__(self, *, max_inflight_per_model: int = 256) -> None:
        self._models: dict[str, ServedModel] = {}
        self._max_inflight = max_inflight_per_model

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def register(self, name: str, path: Path, fmt: str) -> ServedModel:
        """Make a model on disk answerable; it loads on first use or on ``load``."""
        current = self._models.get(name)
        if current is not None and current.path == path and current.format == fmt:
            return current
        if current is not None:
            raise ValueError(f"model '{name}' is registered with other files; unregister it first")
        model = ServedModel(name=name, path=path, format=fmt)
        self._models[name] = model
        return model

    async def load(self, name: str) -> ServedModel:
        """Load the model if it is not warm; concurrent callers share one load."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        if model.runtime is not None:
            return model
        if model._load is None:
            model._load = asyncio.create_task(self._load(model))
        try:
            await asyncio.shield(model._load)
        except Exception as exc:
            raise ModelLoadError(f"model '{name}' failed to load: {exc}") from exc
        return model

    async def _load(self, model: ServedModel) -> Runtime:
        model.state, model.error = State.LOADING, None
        started = time.perf_counter()
        log.info("loading model", extra={"model": model.name, "format": model.format})
        try:
            runtime = await asyncio.to_thread(load_runtime, model.format, model.path)
        except Exception as exc:
            model.state, model.error, model._load = State.ERROR, str(exc), None
            log.error("model load failed", extra={"model": model.name, "error": str(exc)})
            raise
        model.runtime, model.state = runtime, State.WARM
        model.load_seconds = time.perf_counter() - started
        model.device = "cpu"
        model.last_used = time.time()
        log.info(
            "model warm",
            extra={"model": model.name, "load_seconds": round(model.load_seconds, 3)},
        )
        return runtime

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ServedModel]:
        """Hold a warm model for one request; unload waits until every holder is done."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        if model.inflight >= self._max_inflight:
            raise ServerOverloaded(
                f"model '{name}' already has {model.inflight} requests in flight"
            )
        model.inflight += 1
        model._idle.clear()
        try:
            if model.runtime is None:
                await self.load(name)
            model.last_used = time.time()
            yield model
        finally:
            model.inflight -= 1
            if model.inflight == 0:
                model._idle.set()

    async def unload(self, name: str) -> None:
        """Free the model's memory after in-flight requests finish; it stays registered."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        await self._release(model)

    async def unregister(self, name: str) -> None:
        """Stop answering for the model: new requests get 404, running ones finish first."""
        model = self._models.pop(name, None)
        if model is not None:
            await self._release(model)

    async def _release(self, model: ServedModel) -> None:
        if model._load is not None:
            await asyncio.gather(model._load, return_exceptions=True)
        await model._idle.wait()
        runtime, model.runtime, model._load = model.runtime, None, None
        if runtime is not None:
            await asyncio.to_thread(runtime.unload)
            log.info("model unloaded", extra={"model": model.name})
        if model.state != State.ERROR:
            model.state = State.DOWNLOADED
