"""Which models this server can answer for, and their life in memory.

The agent registers a model once its files are verified on disk; the repository
loads it on demand (one load however many requests wait for it) onto a device
with room, evicting least-recently-used models that are neither pinned nor busy,
counts the requests using it, and unloads it only after those requests finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodecache.cache import model_files
from nodecache.serve.devices import Device
from nodecache.serve.errors import (
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    NoRoom,
    ServeError,
    ServerOverloaded,
)
from nodecache.serve.metrics import MODEL_EVICTIONS, MODEL_LOADS, RESIDENT_BYTES, forget_model
from nodecache.serve.residency import Candidate, choose_victims, idle_models
from nodecache.serve.runtime import Runtime
from nodecache.serve.runtimes.registry import attach_runtime, device_kinds, load_runtime
from nodecache.serve.settings import ServeSettings
from nodecache.serve.spec import ModelPolicy, ModelSpec, ModelState

__all__ = ["ModelRepository", "ServedModel"]

log = logging.getLogger(__name__)
_DEFAULTS = ServeSettings()


@dataclass
class ServedModel:
    """A registered model's life in memory; ``spec`` says what it is and how it is kept."""

    spec: ModelSpec
    estimated_bytes: int = 0  # from the files, before loading
    measured_bytes: int | None = None  # resident growth seen while loading
    state: ModelState = ModelState.DOWNLOADED
    runtime: Runtime | None = None
    device: Device | None = None
    error: str | None = None
    inflight: int = 0
    loads: int = 0
    last_used: float = 0.0
    load_seconds: float | None = None
    # Moving average of the runtime's call time; short calls skip the thread hop.
    typical_predict: float | None = None
    # Bounds the model's concurrent runtime calls; the rest of its requests wait here.
    slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(_DEFAULTS.model_concurrency), repr=False
    )
    _load: asyncio.Task[Runtime] | None = field(default=None, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pinned(self) -> bool:
        return self.spec.pinned

    @property
    def batching(self) -> tuple[int, float] | None:
        return self.spec.batching

    @property
    def idle_timeout(self) -> float | None:
        return self.spec.idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float | None) -> None:
        self.spec = replace(self.spec, idle_timeout=seconds)

    @property
    def charged_bytes(self) -> int:
        """What the model counts against its device's budget."""
        return max(self.estimated_bytes, self.measured_bytes or 0)

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or (self._load is not None and self.runtime is None)

    def to_json(self) -> dict[str, Any]:
        """What status reports show of a served model."""
        return {
            "state": str(self.state),
            "format": self.spec.format,
            "path": str(self.spec.path),
            "device": self.device.name if self.device else None,
            "residentBytes": self.charged_bytes if self.runtime else 0,
            "loadSeconds": self.load_seconds,
            "lastUsed": self.last_used or None,
            "inflight": self.inflight,
            "loads": self.loads,
            "pinned": self.pinned,
            "error": self.error,
        }

    def candidate(self) -> Candidate:
        return Candidate(self.name, self.charged_bytes, self.last_used, self.pinned, self.busy)


def _files_size(path: Path) -> int:
    """The model's own files; a runtime's derived copy of them is not a second model."""
    return sum(p.stat().st_size for p in model_files(path))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ModelRepository:
    """Registered models by name; loads are shared and budgeted, unloads wait for readers."""

    def __init__(
        self,
        devices: list[Device] | None = None,
        *,
        max_inflight_per_model: int = _DEFAULTS.model_queue,
        max_concurrency_per_model: int = _DEFAULTS.model_concurrency,
        max_concurrent_loads: int = 1,
    ) -> None:
        self.devices = devices or [Device("cpu", 0, 1 << 62)]
        self._models: dict[str, ServedModel] = {}
        self._max_inflight = max_inflight_per_model
        self._max_concurrency = max_concurrency_per_model
        # One load at a time by default: loads compete for the same disk, and a lone
        # load lets the resident growth be measured.
        self._load_slots = asyncio.Semaphore(max_concurrent_loads)

    @property
    def max_concurrency(self) -> int:
        """Runtime calls one model may run at once (Triton's instance count)."""
        return self._max_concurrency

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def register(
        self,
        spec: ModelSpec | str,
        path: Path | None = None,
        fmt: str | None = None,
        /,
        **fields: Any,
    ) -> ServedModel:
        """Make a model on disk answerable; it loads on first use (unless the spec's
        ``on_demand`` is False) or on ``load``. Takes a ``ModelSpec``, or its fields
        (``register(name, path, fmt, pinned=True)``). Registering the same files again
        only updates the policy."""
        if not isinstance(spec, ModelSpec):
            assert path is not None and fmt is not None, "a name needs a path and a format"
            spec = ModelSpec(spec, path, fmt, **fields)
        current = self._models.get(spec.name)
        if current is not None:
            if not current.spec.same_files(spec):
                raise ValueError(
                    f"model '{spec.name}' is registered with other files; unregister it"
                )
            current.spec = current.spec.with_policy(spec.policy)
            return current
        size = spec.size_hint if spec.size_hint is not None else _files_size(spec.path)
        model = ServedModel(
            spec, estimated_bytes=size, slots=asyncio.Semaphore(self._max_concurrency)
        )
        self._models[spec.name] = model
        return model

    def set_policy(self, name: str, policy: ModelPolicy) -> None:
        """Change how a registered model is kept warm, in place (unknown names: nothing)."""
        model = self._models.get(name)
        if model is not None:
            model.spec = model.spec.with_policy(policy)

    # -- loading -----------------------------------------------------------------

    async def load(
        self, name: str, *, evict: bool = True, weights: dict[str, Any] | None = None
    ) -> ServedModel:
        """Load the model if it is not warm; concurrent callers share one load.

        With ``evict=False`` (pre-warming) the model loads only where it fits as is. With
        ``weights`` (exported by another worker on the same device) it attaches to them
        instead of reading its files.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        if model.runtime is not None:
            return model
        if model._load is None:
            model._load = asyncio.create_task(self._load(model, evict, weights))
        try:
            await asyncio.shield(model._load)
        except ServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model '{name}' failed to load: {exc}") from exc
        return model

    async def _load(
        self, model: ServedModel, evict: bool, weights: dict[str, Any] | None
    ) -> Runtime:
        try:
            async with self._load_slots:
                device = await self._place(model, evict)
                model.state, model.error = ModelState.LOADING, None
                return await self._load_onto(model, device, weights)
        except Exception as exc:
            model._load = None
            if not isinstance(exc, NoRoom):
                model.state, model.error = ModelState.ERROR, str(exc)
                log.error("model load failed", extra={"model": model.name, "error": str(exc)})
            raise

    async def _place(self, model: ServedModel, evict: bool) -> Device:
        """Pick a device and reserve the model's bytes there, evicting if allowed."""
        kinds = device_kinds(model.spec.format)
        usable = [d for d in self.devices if d.kind in kinds]
        needed = model.charged_bytes
        for device in usable:
            if needed <= device.free:
                device.used += needed
                return device
        if evict:
            for device in usable:
                victims = choose_victims(self._warm_on(device), needed, device.free)
                if victims is None:
                    continue
                for victim in victims:
                    log.info("evicting model", extra={"model": victim, "for": model.name})
                    MODEL_EVICTIONS.labels(victim, "room").inc()
                    await self._release(self._models[victim])
                if needed <= device.free:
                    device.used += needed
                    return device
        budgets = ", ".join(f"{d.name}: {d.free} of {d.budget} free" for d in usable)
        raise NoRoom(
            f"model '{model.name}' needs {needed} bytes and no device has room "
            f"({budgets}); the warm models that hold it are pinned or busy"
        )

    def _warm_on(self, device: Device) -> list[Candidate]:
        return [m.candidate() for m in self._models.values() if m.device is device]

    async def _load_onto(
        self, model: ServedModel, device: Device, weights: dict[str, Any] | None
    ) -> Runtime:
        started, rss_before = time.perf_counter(), _resident_bytes()
        log.info("loading model", extra={"model": model.name, "device": device.name,
                                         "attach": weights is not None})  # fmt: skip
        try:
            if weights is None:
                runtime = await asyncio.to_thread(
                    load_runtime, model.spec.format, model.spec.path,
                    device=device.name, entrypoint=model.spec.entrypoint,
                )  # fmt: skip
            else:
                runtime = await asyncio.to_thread(
                    attach_runtime, model.spec.format, model.spec.path,
                    device=device.name, entrypoint=model.spec.entrypoint, weights=weights,
                )  # fmt: skip
        except BaseException:
            device.used -= model.charged_bytes
            raise
        reserved = model.charged_bytes
        reported = getattr(runtime, "resident_bytes", None)
        if reported is not None:
            model.measured_bytes = int(reported)
        elif device.kind == "cpu":
            model.measured_bytes = max(0, _resident_bytes() - rss_before)
        device.used += model.charged_bytes - reserved
        model.runtime, model.device, model.state = runtime, device, ModelState.WARM
        model.load_seconds = time.perf_counter() - started
        model.last_used = time.time()
        model.loads += 1
        MODEL_LOADS.labels(model.name).inc()
        RESIDENT_BYTES.labels(model.name, device.name).set(model.charged_bytes)
        log.info(
            "model warm",
            extra={
                "model": model.name,
                "device": device.name,
                "bytes": model.charged_bytes,
                "load_seconds": round(model.load_seconds, 3),
            },
        )
        return runtime

    # -- using -------------------------------------------------------------------

    def use(self, name: str) -> _Use:
        """Hold a warm model for one request; unload waits until every holder is done.

        ``async with repository.use(name) as model:``; a class rather than an
        ``@asynccontextmanager``, whose generator costs ~5 µs on every request."""
        return _Use(self, name)

    # -- unloading ---------------------------------------------------------------

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
        forget_model(name)  # also a declared name that never got this far

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload models past their ``idle_timeout``; returns their names."""
        warm = [m.candidate() for m in self._models.values() if m.runtime is not None]
        timeouts = {n: m.idle_timeout for n, m in self._models.items() if m.idle_timeout}
        names = idle_models(warm, timeouts, time.time() if now is None else now)
        for name in names:
            log.info("unloading idle model", extra={"model": name})
            MODEL_EVICTIONS.labels(name, "idle").inc()
            await self._release(self._models[name])
        return names

    async def _release(self, model: ServedModel) -> None:
        if model._load is not None:
            await asyncio.gather(model._load, return_exceptions=True)
        await model._idle.wait()
        runtime, model.runtime, model._load = model.runtime, None, None
        device, model.device = model.device, None
        if runtime is not None:
            await asyncio.to_thread(runtime.unload)
            log.info("model unloaded", extra={"model": model.name})
        if device is not None:
            device.used -= model.charged_bytes
            RESIDENT_BYTES.labels(model.name, device.name).set(0)
        if model.state != ModelState.ERROR:
            model.state = ModelState.DOWNLOADED


class _Use:
    """One request's hold on a model (see :meth:`ModelRepository.use`)."""

    __slots__ = ("_model", "_name", "_repository")

    def __init__(self, repository: ModelRepository, name: str) -> None:
        self._repository, self._name = repository, name
        self._model: ServedModel | None = None

    async def __aenter__(self) -> ServedModel:
        repository, name = self._repository, self._name
        model = repository._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        if model.inflight >= repository._max_inflight:
            raise ServerOverloaded(
                f"model '{name}' already has {model.inflight} requests in flight; retry later"
            )
        model.inflight += 1
        model._idle.clear()
        self._model = model
        try:
            if model.runtime is None:
                if not model.spec.on_demand:
                    raise ModelNotReady(f"model '{name}' is not warm on this worker")
                await repository.load(name)
        except BaseException:
            self._release(model)
            raise
        model.last_used = time.time()
        return model

    async def __aexit__(self, *exc: object) -> None:
        if self._model is not None:
            self._release(self._model)

    @staticmethod
    def _release(model: ServedModel) -> None:
        model.inflight -= 1
        if model.inflight == 0:
            model._idle.set()
