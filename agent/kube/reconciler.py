"""``nodecache reconciler``: one active replica turns caches, groups and reports into placement.

Every replica keeps informers warm; only the Lease holder writes. A pass is level-triggered:
observe (informers), ``placement.plan`` (pure), act (writes that differ from what is there).
It runs on every change, debounced, and every ``resync_interval`` regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import socket
import uuid
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from nodecache.agent.kube.api import (
    LOCAL_MODEL_CACHES,
    LOCAL_MODEL_NAMESPACE_CACHES,
    LOCAL_MODEL_NODE_GROUPS,
    LOCAL_MODEL_NODES,
    NODES,
    Kube,
    Resource,
    connect,
)
from nodecache.agent.kube.errors import ApiConflict, ApiError, ApiNotFound
from nodecache.agent.kube.leader import LeaderElector
from nodecache.agent.kube.placement import FINALIZER, Event, Plan, plan
from nodecache.agent.kube.watching import Informer
from nodecache.agent.settings import ReconcilerOptions
from nodecache.serve.http import NodeServer
from nodecache.serve.loop import on_stop_signal

__all__ = ["Reconciler", "ReconcilerOptions", "run_reconciler"]

log = logging.getLogger(__name__)
JSON = dict[str, Any]
PASSES = Counter("nodecache_reconciler_passes_total", "Reconcile passes run while leading")
WRITES = Counter("nodecache_reconciler_writes_total", "Objects written by the reconciler", ["kind"])
MAX_BODY = 1024
"""Bytes a request body to the metrics port may have: its two routes read none."""


async def run_reconciler(options: ReconcilerOptions, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or asyncio.Event()
    on_stop_signal(stop)
    kube = Kube(await asyncio.to_thread(connect, options.kubeconfig))
    reconciler = Reconciler(kube, options)
    try:
        health = await _start_health(options, reconciler)
    except BaseException:
        kube.api.close()
        raise
    task = asyncio.create_task(reconciler.run())
    log.info("reconciler started", extra={"identity": reconciler.elector.identity})
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if health is not None:
            await health.stop()
        kube.api.close()
        log.info("reconciler stopped")


class Reconciler:
    def __init__(self, kube: Kube, options: ReconcilerOptions) -> None:
        self.kube, self.options = kube, options
        self.wake = asyncio.Event()

        def informer(resource: Resource) -> Informer:
            return Informer(
                kube, resource, on_change=self.wake.set, watch_timeout=options.watch_timeout
            )

        self.caches = informer(LOCAL_MODEL_CACHES)
        self.namespace_caches = informer(LOCAL_MODEL_NAMESPACE_CACHES)
        self.groups = informer(LOCAL_MODEL_NODE_GROUPS)
        self.nodes = informer(NODES)
        self.local_nodes = informer(LOCAL_MODEL_NODES)
        self.informers = [
            self.caches,
            self.namespace_caches,
            self.groups,
            self.nodes,
            self.local_nodes,
        ]
        identity = options.identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.elector = LeaderElector(
            kube,
            namespace=options.lease_namespace,
            name=options.lease_name,
            identity=identity,
            lease_duration=options.lease_duration,
            renew_deadline=options.renew_deadline,
            retry_period=options.retry_period,
        )
        self.passes = 0

    async def run(self) -> None:
        tasks = [asyncio.create_task(i.run()) for i in self.informers]
        try:
            await self.elector.run(self._lead)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _lead(self) -> None:
        for informer in self.informers:
            await informer.synced.wait()
        self.wake.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.options.resync_interval)
            await asyncio.sleep(0.05)  # a burst of events: one pass
            self.wake.clear()
            started = asyncio.get_running_loop().time()
            try:
                await self.reconcile_once()
            except ApiError as exc:
                log.warning("reconcile pass failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                self.wake.set()
            except Exception:  # one bad object must not stop placement for everyone
                log.exception("reconcile pass failed; retrying")
                await asyncio.sleep(5.0)
                self.wake.set()
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, self.options.min_pass_interval - elapsed))

    async def reconcile_once(self) -> Plan:
        """One observe-plan-act pass."""
        self.passes += 1
        PASSES.inc()
        caches = self.caches.items() + self.namespace_caches.items()
        for cache in caches:
            await self._hold(cache)
        result = plan(
            caches,
            self.groups.items(),
            self.nodes.items(),
            self.local_nodes.items(),
            agent_timeout=self.options.agent_timeout,
        )
        await self._act(result)
        return result

    async def _hold(self, cache: JSON) -> None:
        """Our finalizer on every live cache, so a delete waits for copies to be unplaced."""
        meta = cache["metadata"]
        finalizers = meta.get("finalizers") or []
        if meta.get("deletionTimestamp") or FINALIZER in finalizers:
            return
        body = {"metadata": {"finalizers": [*finalizers, FINALIZER],
                             "resourceVersion": meta["resourceVersion"]}}  # fmt: skip
        await self._write("finalizer", self._resource(cache), meta, body)

    async def _act(self, p: Plan) -> None:
        """Write what differs, several at a time; finalizers go last, once specs are written."""
        writes: list[Awaitable[None]] = []
        for name, entries in p.node_specs.items():
            current = self.local_nodes.get(name)
            if current is None:
                writes.append(self._create_node(name, entries))
            elif ((current.get("spec") or {}).get("localModels") or []) != entries:
                body = {"spec": {"localModels": entries}}
                writes.append(
                    self._write("localmodelnode", LOCAL_MODEL_NODES, current["metadata"], body)
                )
        writes += [self._delete_node(name) for name in p.delete_nodes]
        caches = {(c["metadata"].get("namespace") or "", c["metadata"]["name"]): c
                  for c in self.caches.items() + self.namespace_caches.items()}  # fmt: skip
        for key, status in p.cache_status.items():
            cache = caches[key]
            if cache.get("status") != status:
                res = self._resource(cache)
                writes.append(self._write_status("cache", res, cache["metadata"], status))
        for name, status in p.group_status.items():
            group = self.groups.get(name)
            if group is not None and group.get("status") != status:
                res = LOCAL_MODEL_NODE_GROUPS
                writes.append(self._write_status("group", res, group["metadata"], status))
        await self._bounded(writes)
        releases = [self._release(key, caches[key]) for key in p.release]
        await self._bounded(releases + [self._event(event) for event in p.events])

    async def _bounded(self, writes: list[Awaitable[None]]) -> None:
        """Run ``writes`` with at most ``write_concurrency`` in flight; the first error wins."""
        gate = asyncio.Semaphore(self.options.write_concurrency)

        async def one(write: Awaitable[None]) -> None:
            async with gate:
                await write

        results = await asyncio.gather(*(one(w) for w in writes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _create_node(self, name: str, entries: list[JSON]) -> None:
        uid = ((self.nodes.get(name) or {}).get("metadata") or {}).get("uid")
        # Owned by the Node: the garbage collector removes it with the Node, too.
        owner = [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]
        body = {
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/managed-by": "nodecache"},
                **({"ownerReferences": owner} if uid else {}),
            },
            "spec": {"localModels": entries},
        }
        with contextlib.suppress(ApiConflict):  # made meanwhile: the next pass patches it
            await self.kube.create(LOCAL_MODEL_NODES, body)
            WRITES.labels("localmodelnode").inc()

    async def _delete_node(self, name: str) -> None:
        with contextlib.suppress(ApiNotFound):
            await self.kube.delete(LOCAL_MODEL_NODES, name)
            WRITES.labels("localmodelnode").inc()
            log.info("LocalModelNode of a deleted node removed", extra={"node": name})

    async def _release(self, key: tuple[str, str], cache: JSON) -> None:
        meta = cache["metadata"]
        rest = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        body = {"metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}}
        await self._write("finalizer", self._resource(cache), meta, body)
        log.info("cache released", extra={"cache": "/".join(k for k in key if k)})

    def _resource(self, cache: JSON) -> Resource:
        namespaced = cache.get("kind") == "LocalModelNamespaceCache"
        return LOCAL_MODEL_NAMESPACE_CACHES if namespaced else LOCAL_MODEL_CACHES

    async def _write(self, kind: str, res: Resource, meta: JSON, body: JSON) -> None:
        try:
            await self.kube.patch(res, meta["name"], body, namespace=meta.get("namespace"))
            WRITES.labels(kind).inc()
        except (ApiConflict, ApiNotFound):
            self.wake.set()  # changed or gone meanwhile: look again

    async def _write_status(self, kind: str, res: Resource, meta: JSON, status: JSON) -> None:
        # JSON patch replaces the whole status: nodes that left drop out of nodeStatus.
        body = [{"op": "add", "path": "/status", "value": status}]
        try:
            await self.kube.patch(
                res, meta["name"], body, namespace=meta.get("namespace"), status=True
            )
            WRITES.labels(kind).inc()
        except ApiNotFound:
            pass

    async def _event(self, event: Event) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = event.namespace or self.options.event_namespace
        body = {
            "metadata": {"generateName": f"{event.name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": LOCAL_MODEL_CACHES.api_version,
                "kind": event.kind,
                "name": event.name,
                "namespace": event.namespace or None,
                "uid": event.uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": "nodecache-reconciler"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.kube.event(namespace, body)
        except ApiError as exc:  # events are for people; never fail a pass for one
            log.info("event not recorded", extra={"error": str(exc)})


async def _start_health(options: ReconcilerOptions, reconciler: Reconciler) -> NodeServer | None:
    """``/healthz`` and ``/metrics`` within the node's transport limits: the port listens on
    every address by default, so a slow or oversized request from anywhere must not hold it."""
    if not options.metrics_port:
        return None

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"leading": reconciler.elector.leading})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    server = NodeServer(
        app,
        None,
        tcp_host=options.metrics_host,
        tcp_port=options.metrics_port,
        limits=options.limits,
    )
    try:
        await server.start()
    except OSError as exc:  # one line for the operator, not a traceback
        if exc.errno != errno.EADDRINUSE:
            raise
        port = options.metrics_port
        raise SystemExit(
            f"nodecache: metrics port {port} is in use ({exc.strerror}); pass --metrics-port"
        ) from None
    return server
