"""Informer: a local copy of some objects, kept current by list + watch.

List once, then watch from the list's resourceVersion; resume each watch from the last
version seen (bookmarks included); list again on 410 Gone; back off while the API server
is away. The copy stays as it was meanwhile, so whoever reads it keeps working.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from nodecache.agent.kube.api import Backoff, Kube, Resource, run_in_daemon_thread
from nodecache.agent.kube.errors import ApiError, ApiGone

__all__ = ["Informer"]

log = logging.getLogger(__name__)
JSON = dict[str, Any]
RESTARTS = Counter(
    "nodecache_kube_watch_restarts_total",
    "Watches of the Kubernetes API started again, by resource and why "
    "(expired: 410 Gone, relisted; unavailable: API server away or failing).",
    ["resource", "reason"],
)


class Informer:
    def __init__(
        self,
        kube: Kube,
        resource: Resource,
        *,
        on_change: Callable[[], None] | None = None,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        **selectors: str,
    ) -> None:
        self.kube = kube
        self.resource = resource
        self.selectors = selectors
        self.on_change = on_change or (lambda: None)
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.objects: dict[tuple[str, str], JSON] = {}
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.relists = 0
        self._stopped = False

    def get(self, name: str, namespace: str = "") -> JSON | None:
        return self.objects.get((namespace, name))

    def items(self) -> list[JSON]:
        return list(self.objects.values())

    async def run(self) -> None:
        try:
            while True:
                try:
                    if self.resource_version is None:
                        await self._relist()
                    await self._watch()
                    self.backoff.reset()
                except ApiGone:
                    RESTARTS.labels(self.resource.plural, "expired").inc()
                    log.info("watch expired; listing again", extra=self._extra())
                    self.resource_version = None
                except ApiError as exc:
                    RESTARTS.labels(self.resource.plural, "unavailable").inc()
                    delay = self.backoff.next()
                    log.warning(
                        "API server unavailable; retrying",
                        extra={**self._extra(), "error": str(exc), "retry_in": round(delay, 2)},
                    )
                    await asyncio.sleep(delay)
                except Exception:  # a bug or an odd object must not end the watch for good
                    log.exception("watch failed; listing again", extra=self._extra())
                    self.resource_version = None
                    await asyncio.sleep(self.backoff.next())
        finally:
            self._stopped = True

    async def _relist(self) -> None:
        listing = await self.kube.list(self.resource, **self.selectors)
        self.objects = {_key(o): o for o in listing.get("items") or []}
        self.resource_version = listing["metadata"]["resourceVersion"]
        self.relists += 1
        self.synced.set()
        self.on_change()

    async def _watch(self) -> None:
        assert self.resource_version is not None
        loop = asyncio.get_running_loop()

        def on_event(kind: str, obj: JSON) -> None:
            loop.call_soon_threadsafe(self._apply, kind, obj)

        version = self.resource_version

        def watch() -> str:
            return self.kube.watch_once(
                self.resource,
                version,
                on_event,
                timeout=self.watch_timeout,
                stopped=lambda: self._stopped,
                **self.selectors,
            )

        self.resource_version = await run_in_daemon_thread(watch)

    def _apply(self, kind: str, obj: JSON) -> None:
        if self._stopped:
            return
        key = _key(obj)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.resource_version = obj["metadata"]["resourceVersion"]
        self.on_change()

    def _extra(self) -> JSON:
        return {"resource": self.resource.plural, **self.selectors}


def _key(obj: JSON) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]
