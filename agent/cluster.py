"""Cluster mode: the node agent told what to hold by its LocalModelNode.

Same NodeAgent, socket and metrics as standalone; the declarations come from the API
server instead of a folder. The socket is up before the API server is first reached and
stays up while it is away: warm models keep answering, status catches up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.kube.api import (
    LOCAL_MODEL_CACHES,
    LOCAL_MODEL_NAMESPACE_CACHES,
    LOCAL_MODEL_NODES,
    PODS,
    Kube,
    connect,
)
from agent.kube.callers import CallerIdentity, namespace_guard
from agent.kube.nodestatus import (
    RequestRates,
    StatusWriter,
    disk_capacity,
    node_status,
    resolve,
)
from agent.kube.watching import Informer
from agent.node import NodeAgent
from agent.standalone import SOCKET_NAME, STATUS_PATH
from cache import ModelStore
from serve.dataplane import DataPlane
from serve.devices import discover_devices
from serve.host import LocalHost
from serve.http import NodeServer, build_app
from serve.repository import ModelRepository

__all__ = ["ClusterOptions", "run_cluster"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterOptions:
    node_name: str
    cache_dir: Path
    socket_dir: Path
    kubeconfig: Path | None = None
    """None: in-cluster config, else $KUBECONFIG, else ~/.kube/config."""
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    metrics_port: int | None = 9464
    metrics_host: str = "0.0.0.0"
    shutdown_timeout: float = 30.0
    status_interval: float = 10.0
    """Least seconds between two status writes: at most 60/status_interval a minute."""
    heartbeat_interval: float = 30.0
    """A status write at least this often, changed or not."""
    watch_timeout: float = 300.0
    """Seconds one watch request lasts before it is renewed from its resourceVersion."""
    cpu_memory_budget: int | None = None
    idle_check_seconds: float = 5.0
    rate_window: float = 10.0
    """Seconds over which the request rate per model is reported."""
    proc_root: Path = Path("/proc")
    """Where callers' cgroups are read (the host's /proc: the DaemonSet runs with hostPID)."""


async def run_cluster(options: ClusterOptions, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), following this node's LocalModelNode."""
    if not options.node_name:
        raise SystemExit("cluster mode needs the node name (--node-name or $NODE_NAME)")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(RuntimeError, ValueError):  # not on the main thread (tests)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    options.cache_dir.mkdir(parents=True, exist_ok=True)
    store = ModelStore(options.cache_dir)
    kept = await asyncio.to_thread(store.scan)
    log.info("cache scanned", extra={"dir": str(options.cache_dir), "models": len(kept)})
    devices = discover_devices(cpu_budget=options.cpu_memory_budget)
    log.info("devices", extra={"devices": [d.to_json() for d in devices]})
    repository = ModelRepository(devices)
    agent = NodeAgent(store, LocalHost(repository))
    app = build_app(DataPlane(repository, catalog=agent))

    async def status(_: web.Request) -> web.Response:
        return web.json_response(agent.status())

    app.router.add_get(STATUS_PATH, status)
    server = NodeServer(
        app,
        options.socket_dir / SOCKET_NAME,
        tcp_host=options.http_host,
        tcp_port=options.http_port,
        shutdown_timeout=options.shutdown_timeout,
    )
    kube = Kube(await asyncio.to_thread(connect, options.kubeconfig))
    follower = NodeFollower(kube, agent, options)
    # Namespaced models answer only to their namespace's pods (before the app is frozen).
    identity = CallerIdentity(follower.pods, options.proc_root)
    app.middlewares.append(namespace_guard(follower.access.get, identity))
    await server.start()
    metrics = await _start_metrics(options)
    log.info(
        "agent started",
        extra={
            "mode": "cluster",
            "node": options.node_name,
            "socket": str(server.socket_path),
            "metrics_port": options.metrics_port,
        },
    )
    background = [
        asyncio.create_task(follower.run()),
        asyncio.create_task(_unload_idle(repository, options.idle_check_seconds)),
    ]
    try:
        await stop.wait()
    finally:
        log.info("agent stopping")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await server.stop()
        if metrics is not None:
            await metrics.cleanup()
        await agent.close()
        kube.api.close()
        log.info("agent stopped")


class NodeFollower:
    """Watches the node's LocalModelNode and the caches; applies; reports status."""

    def __init__(self, kube: Kube, agent: NodeAgent, options: ClusterOptions) -> None:
        self.kube, self.agent, self.options = kube, agent, options
        self.wake = asyncio.Event()
        self.node = Informer(
            kube,
            LOCAL_MODEL_NODES,
            on_change=self.wake.set,
            watch_timeout=options.watch_timeout,
            field_selector=f"metadata.name={options.node_name}",
        )
        self.caches = Informer(
            kube, LOCAL_MODEL_CACHES, on_change=self.wake.set, watch_timeout=options.watch_timeout
        )
        self.namespace_caches = Informer(
            kube,
            LOCAL_MODEL_NAMESPACE_CACHES,
            on_change=self.wake.set,
            watch_timeout=options.watch_timeout,
        )
        self.pods = Informer(
            kube,
            PODS,
            watch_timeout=options.watch_timeout,
            field_selector=f"spec.nodeName={options.node_name}",
        )
        self.access: dict[str, frozenset[str] | None] = {}
        self.origins: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.generation: int | None = None
        self.rates = RequestRates(options.rate_window)
        self.status = StatusWriter(
            kube,
            options.node_name,
            self.snapshot,
            min_interval=options.status_interval,
            heartbeat_interval=options.heartbeat_interval,
        )

    def snapshot(self) -> dict[str, Any]:
        return node_status(
            self.agent.status(),
            disk=disk_capacity(self.options.cache_dir),
            origins=self.origins,
            errors=self.errors,
            generation=self.generation,
            rates=self.rates.rates(),
        )

    async def run(self) -> None:
        informers = (self.node, self.caches, self.namespace_caches, self.pods)
        tasks = [asyncio.create_task(i.run()) for i in informers]
        tasks.append(asyncio.create_task(self.status.run()))
        try:
            await self._follow()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            try:
                await self._follow_changes()
            except Exception:  # keep following: the next change gets a fresh try
                log.exception("applying the LocalModelNode failed; retrying")
                await asyncio.sleep(1.0)
                self.wake.set()

    async def _follow_changes(self) -> None:
        informers = (self.node, self.caches, self.namespace_caches)
        collected = False
        applied: Any = None
        while True:
            await self.wake.wait()
            await asyncio.sleep(0.05)  # let a burst of events land: one apply for all
            self.wake.clear()
            if not all(i.synced.is_set() for i in informers):
                continue
            node = self.node.get(self.options.node_name)
            if node is None:
                continue  # no LocalModelNode yet: keep what is there until one says otherwise
            caches = {**self.caches.objects, **self.namespace_caches.objects}
            resolved = resolve(node, caches)
            self.generation = node["metadata"].get("generation")
            self.origins, self.errors = resolved.origins, resolved.errors
            self.access.clear()
            self.access.update(resolved.access)
            if (resolved.declarations, resolved.errors) != applied:
                await self.agent.apply(
                    resolved.declarations, origins=resolved.origins, errors=resolved.errors
                )
                applied = (resolved.declarations, resolved.errors)
            if resolved.complete and not collected:
                await self.agent.collect_garbage()  # leftovers from before a restart
                collected = True
            self.status.wake.set()


async def _unload_idle(repository: ModelRepository, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        await repository.unload_idle()


async def _start_metrics(options: ClusterOptions) -> web.AppRunner | None:
    if not options.metrics_port:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, options.metrics_host, options.metrics_port).start()
    return runner
