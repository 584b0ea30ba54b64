"""The node's control loop: make disk and memory hold what the declarations ask for.

``apply`` is level-triggered: it is given the whole desired set each time and
starts, restarts or retires one task per model. Each model's task drives it
Pending -> Downloading -> Downloaded -> Loading -> Warm and retries failures with
exponential backoff; its status says what went wrong and when the next try is.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nodecache.agent.declarations import ModelDeclaration, namespace_of_key
from nodecache.cache import CacheError, ModelStore, redact_uri
from nodecache.cache.layout import split_scope
from nodecache.serve.errors import NoRoom, ServeError
from nodecache.serve.host import ModelHost
from nodecache.serve.metrics import forget_model
from nodecache.serve.routing import Caller, Route, Router
from nodecache.serve.runtimes import UnsupportedFormat, detect_format
from nodecache.serve.spec import ModelPolicy, ModelSpec, ModelState

__all__ = ["Credentials", "ModelStatus", "NodeAgent", "own_parameters"]

log = logging.getLogger(__name__)

Credentials = Callable[[ModelDeclaration], Awaitable[Mapping[str, str] | None]]
"""What a declaration's source is opened with, resolved at each fetch (cluster mode reads
the Secrets it names: :class:`nodecache.agent.kube.secrets.SecretCredentials`)."""


@dataclass
class ModelStatus:
    """What the agent itself knows of a model; serve/ knows the rest once it is on disk."""

    name: str
    source_uri: str
    declared_in: str | None
    declared_size: int
    state: ModelState = ModelState.PENDING
    bytes_done: int = 0
    bytes_total: int | None = None
    resolved: str | None = None
    """What the source's reference resolved to when the copy on disk was fetched."""
    error: str | None = None
    next_retry: float | None = None
    attempts: int = 0


class NodeAgent:
    def __init__(
        self,
        store: ModelStore,
        host: ModelHost,
        *,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
        router: Router | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.router = router or Router()
        self._retry = (retry_base, retry_max)
        self._desired: dict[str, ModelDeclaration] = {}
        self._status: dict[str, ModelStatus] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.declaration_errors: dict[str, str] = {}
        self.applied = False  # whether the first declarations have been applied
        self.credentials: Credentials = own_parameters

    # -- desired state ---------------------------------------------------------

    async def apply(
        self,
        declarations: dict[str, ModelDeclaration],
        *,
        origins: dict[str, str] | None = None,
        errors: dict[str, str] | None = None,
        access: dict[str, frozenset[str] | None] | None = None,
    ) -> None:
        """Converge on ``declarations`` (by key); models not in it are unloaded and deleted.

        Requests follow the new declarations at once (weights, versions gone), before a
        removed model is drained and unloaded; a new one takes requests once registered.
        ``access``: a cluster cache's allowed namespaces, by key."""
        origins = origins or {}
        self.declaration_errors = dict(errors or {})
        served_before = {route.name for route in self.router.table.routes}
        self.router.update(
            _route(key, decl, (access or {}).get(key)) for key, decl in declarations.items()
        )
        # Requests refused before a version was chosen are counted under the served name.
        served_now = {route.name for route in self.router.table.routes}
        for name in served_before - served_now - set(declarations):
            forget_model(name)
        previous, self._desired = self._desired, dict(declarations)
        # What is declared is never evicted to make room on disk; leftovers may be.
        self.store.protect(d.store_uri for d in declarations.values())
        for name, old in previous.items():
            new = declarations.get(name)
            if new is None or not new.same_model(old):
                await self._retire(name, old)
        for name, decl in declarations.items():
            old = previous.get(name)
            if old is not None and decl.same_model(old) and name in self._status:
                status = self._status[name]
                status.declared_in, status.declared_size = origins.get(name), decl.model_size
                # A warm policy edit applies in place.
                await self.host.set_policy(name, _policy(decl))
                if decl.keep_warm != old.keep_warm and self.host.describe(name) is not None:
                    await self._rewarm(decl)
                continue
            self._status[name] = ModelStatus(
                name, decl.source_uri, origins.get(name), decl.model_size
            )
            self._tasks[name] = asyncio.create_task(self._keep(decl), name=f"model:{name}")
            log.info("model declared", extra={"model": name, "source": redact_uri(decl.source_uri)})
        self.applied = True

    async def _rewarm(self, decl: ModelDeclaration) -> None:
        """The warm decision for this node changed: load, or give the memory back."""
        if decl.keep_warm is False and not decl.warm.pinned:
            await self.host.unload(decl.key)
            log.info("model cooled on this node", extra={"model": decl.key})
        else:
            task = self._tasks.get(decl.key)
            if task is None or task.done():
                self._tasks[decl.key] = asyncio.create_task(
                    self._keep(decl), name=f"model:{decl.key}"
                )

    async def _retire(self, name: str, decl: ModelDeclaration) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.host.unregister(name)  # waits for in-flight requests
        still_used = any(d.store_uri == decl.store_uri for d in self._desired.values())
        try:
            if not still_used and await asyncio.to_thread(self.store.remove, decl.store_uri):
                log.info("model deleted from disk", extra={"model": name})
        except CacheError as exc:  # e.g. an init container still reading it
            log.warning("model kept on disk", extra={"model": name, "reason": str(exc)})
        # Last: a model gone from status is gone from memory and disk too.
        self._status.pop(name, None)
        log.info("model retired", extra={"model": name})

    async def collect_garbage(self) -> None:
        """Delete disk copies no declaration refers to (left from before a restart)."""
        wanted = {d.store_uri for d in self._desired.values()}
        for stored in await asyncio.to_thread(self.store.models):
            # A model still in use (mounted into a pod through CSI) stays until released.
            if stored.source_uri not in wanted and not self.store.in_use(stored.source_uri):
                await asyncio.to_thread(self.store.remove, stored.source_uri)
                log.info(
                    "undeclared model deleted from disk",
                    extra={"source": redact_uri(split_scope(stored.source_uri)[0])},
                )

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in self.host.names():
            await self.host.unregister(name)

    # -- one model -------------------------------------------------------------

    async def _keep(self, decl: ModelDeclaration) -> None:
        status = self._status[decl.key]
        while True:
            status.attempts += 1
            try:
                await self._bring_up(decl, status)
                status.attempts, status.error, status.next_retry = 0, None, None
                return
            except Exception as exc:
                if not isinstance(exc, (CacheError, UnsupportedFormat, ServeError, OSError)):
                    log.exception("unexpected error bringing a model up", extra={"model": decl.key})
                delay = self._backoff(status.attempts)
                status.state, status.error = ModelState.ERROR, str(exc)
                status.next_retry = time.time() + delay
                log.error(
                    "model failed",
                    extra={"model": decl.key, "error": str(exc), "retry_in": round(delay, 1)},
                )
                await asyncio.sleep(delay)

    async def _bring_up(self, decl: ModelDeclaration, status: ModelStatus) -> None:
        stored = self.store.lookup(decl.store_uri)
        if stored is None:
            # Secrets are read only to fetch: a copy on disk serves while the API is away.
            credentials = await self.credentials(decl)
            status.state = ModelState.DOWNLOADING
            status.bytes_done, status.bytes_total = 0, None
            log.info("download started", extra={"model": decl.key})
            started = time.perf_counter()

            def progress(done: int, total: int | None) -> None:
                status.bytes_done, status.bytes_total = done, total

            stored = await self.store.fetch(
                decl.store_uri,
                progress=progress,
                max_bytes=decl.model_size,
                credentials=credentials,
                isolated=decl.namespace is not None,
            )
            log.info(
                "download finished",
                extra={
                    "model": decl.key,
                    "bytes": stored.size_bytes,
                    "seconds": round(time.perf_counter() - started, 3),
                },
            )
        status.bytes_done = status.bytes_total = stored.size_bytes
        status.resolved = stored.resolved
        fmt = decl.format or detect_format(f.path for f in stored.files)
        spec = ModelSpec(decl.key, stored.path, fmt, decl.entrypoint, size_hint=stored.size_bytes)
        await self.host.register(spec.with_policy(_policy(decl)))
        status.error = None
        # The newest declaration: the warm decision may have changed during the download.
        await self._warm(self._desired.get(decl.key, decl))

    async def _warm(self, decl: ModelDeclaration) -> None:
        """Load as the declaration asks: pinned or placed warm here -> load, making room;
        told to stay cold -> only on a request; otherwise only where it fits as is."""
        if decl.keep_warm is False and not decl.warm.pinned:
            return
        must = decl.warm.pinned or decl.keep_warm is True
        try:
            await self.host.load(decl.key, evict=must)
        except NoRoom as exc:
            if must:
                raise
            log.info("model left on disk", extra={"model": decl.key, "reason": str(exc)})

    def _backoff(self, attempt: int) -> float:
        base, cap = self._retry
        return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    # -- what the agent reports -------------------------------------------------

    def declaration(self, name: str) -> ModelDeclaration | None:
        """What is declared under ``name`` now, if anything."""
        return self._desired.get(name)

    def declarations(self) -> list[ModelDeclaration]:
        return list(self._desired.values())

    def progress(self, name: str) -> ModelStatus | None:
        """How far bringing ``name`` up has come (what ``status()`` reports of it)."""
        return self._status.get(name)

    def model_state(self, name: str) -> str | None:
        served = self.host.describe(name)
        if served is not None:
            return str(served["state"])
        status = self._status.get(name)
        return str(status.state) if status else None

    def not_ready_reason(self, name: str) -> str | None:
        status = self._status.get(name)
        if status is None or self.host.describe(name) is not None:
            return None
        if status.state == ModelState.DOWNLOADING:
            total = f" of {status.bytes_total}" if status.bytes_total else ""
            return f"Downloading ({status.bytes_done}{total} bytes)"
        if status.state == ModelState.ERROR:
            return f"Error: {status.error} (next retry in {_seconds_until(status.next_retry)})"
        return str(status.state)

    def status(
        self, shown: Callable[[str], bool] | None = None, caller: Caller | None = None
    ) -> dict[str, Any]:
        """Every model's status (only those ``shown`` says of a key, if given), and the
        declarations refused (a namespace cache's, ``NAMESPACE/NAME``, only to pods of that
        namespace when a ``caller`` is given: its names and errors are that namespace's)."""
        models = []
        for name, status in sorted(self._status.items()):
            if shown is not None and not shown(name):
                continue
            route = self.router.table.route(name)
            entry: dict[str, Any] = {
                "name": name,
                "serving": {
                    "name": route.name if route else name,
                    "version": route.version if route else "1",
                    "traffic": route.traffic if route else 100,
                    "mirror": route.mirror if route else 0,
                },
                "state": str(status.state),
                "source": redact_uri(status.source_uri),  # a presigned query is a credential
                "declaredIn": status.declared_in,
                "modelSize": status.declared_size,
                "bytes": status.bytes_done,
                "bytesTotal": status.bytes_total,
                "resolved": status.resolved,
                "error": status.error,
                "nextRetry": status.next_retry,
            }
            served = self.host.describe(name)
            if served is not None:
                error = served.pop("error", None) or entry["error"]
                entry.update(served, error=error)
            models.append(entry)
        return {
            "models": models,
            "declarationErrors": [
                {"file": f, "error": e}
                for f, e in sorted(self.declaration_errors.items())
                if caller is None or _error_shown(f, caller)
            ],
            "cache": {"dir": str(self.store.root), "usedBytes": self.store.used_bytes()},
            "devices": self.host.devices(),
        }


def _error_shown(declared_as: str, caller: Caller) -> bool:
    """Whether ``caller`` may read the refusal of ``declared_as``: one of a namespace
    cache (``NAMESPACE/NAME``) only from that namespace; any other (a cluster cache, a
    declaration file) from anyone."""
    namespace = namespace_of_key(declared_as)
    return namespace is None or caller() == namespace


async def own_parameters(decl: ModelDeclaration) -> Mapping[str, str] | None:
    """Standalone credentials: only ``spec.storage.parameters``; Secrets need a cluster, so
    the agent's environment carries the rest."""
    return decl.storage_parameters()


def _policy(decl: ModelDeclaration) -> ModelPolicy:
    """How the declaration asks the host to keep the model warm, and answer as which name
    and version."""
    serving = decl.serving
    return ModelPolicy(
        decl.warm.pinned, decl.warm.idle_seconds, decl.batching, serving.name, serving.version
    )


def _route(key: str, decl: ModelDeclaration, allowed: frozenset[str] | None) -> Route:
    serving = decl.serving
    return Route(
        key, serving.name, serving.version, serving.traffic, serving.mirror, decl.namespace, allowed
    )


def _seconds_until(when: float | None) -> str:
    return "now" if when is None else f"{max(0.0, when - time.time()):.0f}s"
