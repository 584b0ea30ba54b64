"""What a node runs, whichever source tells it what to hold: the disk store, the
serving host (in-process or worker processes), the HTTP and gRPC sockets, metrics.

Standalone and cluster modes build one of these and differ only in where their
declarations come from.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from nodecache.agent.node import NodeAgent
from nodecache.agent.settings import SOCKET_NAME, NodeOptions
from nodecache.cache import FetchOptions, ModelStore
from nodecache.cache.metrics import register_store_metrics
from nodecache.serve.dataplane import DataPlane
from nodecache.serve.devices import discover_devices
from nodecache.serve.grpc.server import GrpcServer
from nodecache.serve.host import LocalHost
from nodecache.serve.http import NodeServer, build_app, caller_of
from nodecache.serve.metrics import SERVING_METRICS, request_counts
from nodecache.serve.pool import PoolDataPlane, WorkerPool, build_router_app, worker_devices
from nodecache.serve.repository import ModelRepository
from nodecache.serve.routing import Router
from nodecache.serve.transport import SocketTaken

if TYPE_CHECKING:
    from nodecache.agent.csi.service import CsiServer

__all__ = ["GRPC_SOCKET_NAME", "SOCKET_NAME", "STATUS_PATH", "NodeOptions", "NodeServices"]

log = logging.getLogger(__name__)
GRPC_SOCKET_NAME = "nodecache-grpc.sock"
STATUS_PATH = "/nodecache/v1/status"
T = TypeVar("T")


class NodeServices:
    """Build with ``create``, add routes or middleware to ``app``, then ``start``/``stop``."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.store = ModelStore(
            options.cache_dir,
            options=FetchOptions(registry_mirrors=options.registry_mirror),
            limit_bytes=options.cache_size,
            file_mode=options.cache_mode,
        )
        register_store_metrics(self.store)
        self.pool: WorkerPool | None = None
        self._background: list[asyncio.Task[None]] = []
        self._metrics: NodeServer | None = None
        self._http: NodeServer | None = None
        self._grpc: GrpcServer | None = None
        self._private: Path | None = None
        # Who may call a model over gRPC, which cannot tell who the caller is: a model
        # name -> a refusal reason (None: allowed). Set before start() to restrict.
        # For the CSI service (--csi-endpoint): this node's name. Set before start().
        self.node_name = os.environ.get("NODE_NAME") or socket.gethostname()
        self.csi: CsiServer | None = None
        self._csi_key: Callable[[str, str], str] | None = None
        # Which model answers a served name: the agent writes it, the dataplanes read it.
        self.router = Router()
        # Set by create():
        self.agent: NodeAgent
        self.app: web.Application
        self._dataplane: DataPlane | PoolDataPlane
        self._repository: ModelRepository | None = None

    @classmethod
    async def create(cls, options: NodeOptions) -> NodeServices:
        node = cls(options)
        kept = await asyncio.to_thread(node.store.scan)
        log.info("cache scanned", extra={"dir": str(options.cache_dir), "models": len(kept)})
        if options.verify_on_start == "full":  # before anything can serve a model
            checked = await asyncio.to_thread(node.store.drop_corrupt)
            removed = [v.model.key for v in checked if v.corrupt]
            log.info("cache re-hashed", extra={"models": len(checked), "removed": removed})
        devices = discover_devices(cpu_budget=options.cpu_memory_budget)
        log.info("devices", extra={"devices": [d.to_json() for d in devices]})
        if options.workers or any(d.kind == "cuda" for d in devices):
            # Worker sockets stay out of the socket folder pods mount: a pod reaching a
            # worker directly would bypass the node socket's caller checks.
            node._private = Path(tempfile.mkdtemp(prefix="nodecache-"))
            workers = worker_devices(devices, options.workers)
            node.pool = WorkerPool(workers, node._private, options.serve)
            node.agent = NodeAgent(node.store, node.pool, router=node.router)
            node._dataplane = PoolDataPlane(node.pool, node.agent, node.router)
            node.app = build_router_app(node._dataplane)
        else:
            # One CPU server: serve in this process, no hop between the socket and the model.
            node._repository = ModelRepository(
                devices,
                max_inflight_per_model=options.serve.model_queue,
                max_concurrency_per_model=options.serve.model_concurrency,
            )
            node.agent = NodeAgent(node.store, LocalHost(node._repository), router=node.router)
            node._dataplane = DataPlane(
                node._repository,
                catalog=node.agent,
                max_output_bytes=options.serve.max_output_bytes,
                router=node.router,
            )
            node.app = build_app(node._dataplane)
        node.app.router.add_get(STATUS_PATH, node._status)
        return node

    async def _status(self, request: web.Request) -> web.Response:
        """The node's status, of the models the caller may use (cluster mode: a pod sees
        its namespace's and the cluster's open ones)."""
        visible = {route.key for route in self.router.table.visible(caller_of(request))}
        status = self.agent.status(visible.__contains__, caller_of(request))
        if self.csi is not None:  # pods holding each model mounted
            mounts = self.csi.volumes.mounts(self._csi_key)
            for model in status["models"]:
                model["mounts"] = mounts.get(model["name"], 0)
        return web.json_response(status)

    def request_counts(self) -> dict[str, float]:
        """Inference requests answered so far per model, across worker processes."""
        return self.pool.request_counts() if self.pool is not None else request_counts()

    async def start(self, **log_fields: Any) -> None:
        """Listen and start serving. A port in use ends the start with one line saying which
        flag to change (SystemExit), and nothing is left running."""
        _raise_open_files_limit()
        options = self.options
        if options.metrics_port:
            # First: a port in use must fail the start before workers or sockets exist.
            self._metrics = await _bind(
                f"metrics port {options.metrics_port}", "--metrics-port", self._serve_metrics()
            )
        if self.pool is not None:
            await self.pool.start()
            # Serving metrics come from the workers; this process's copies stay empty.
            for metric in SERVING_METRICS:
                with contextlib.suppress(KeyError):  # already, by an earlier instance
                    REGISTRY.unregister(metric)
            self._every(1.0, self.pool.refresh_all)
        elif self._repository is not None:
            self._every(options.serve.idle_check_seconds, self._repository.unload_idle)
        http = NodeServer(
            self.app,
            options.socket_dir / SOCKET_NAME,
            tcp_host=options.http_host,
            tcp_port=options.http_port,
            shutdown_timeout=options.shutdown_timeout,
            socket_group=options.socket_group,
            limits=options.limits,
        )
        grpc = GrpcServer(
            self._dataplane,  # type: ignore[arg-type]  # both answer what the servicer asks
            options.socket_dir / GRPC_SOCKET_NAME,
            tcp_host=options.http_host,
            tcp_port=options.grpc_port,
            socket_group=options.socket_group,
        )
        # Each server is stopped later only if it started: stopping one that never did
        # would remove a socket file another agent serves on.
        try:
            await _bind(f"HTTP port {options.http_port}", "--http-port", http.start())
            self._http = http
            await _bind(f"gRPC port {options.grpc_port}", "--grpc-port", grpc.start())
            self._grpc = grpc
            if options.csi_endpoint:
                await self._start_csi(options.csi_endpoint)
        except SystemExit:
            await self.stop()
            raise
        log.info(
            "agent started",
            extra={
                **log_fields,
                "socket": str(http.socket_path),
                "http_port": http.tcp_port,
                "grpc_socket": str(grpc.socket_path),
                "grpc_port": grpc.tcp_port,
                "metrics_port": options.metrics_port,
                "workers": len(self.pool.devices()) if self.pool else 0,
            },
        )

    async def _start_csi(self, endpoint: str) -> None:
        """The CSI node service: volumes of a previous run are found and pinned again
        before the first declarations are applied, so none of their files is collected."""
        # Imported here: the CSI stubs are only loaded on nodes that serve CSI.
        from nodecache.agent.csi.node_backend import NodeCsiBackend
        from nodecache.agent.csi.service import CsiServer

        backend = NodeCsiBackend(
            self.agent,
            self.store,
            node_name=self.node_name,
            socket_dir=self.options.socket_dir,
            state_dir=self.options.cache_dir / "csi",
        )
        self._csi_key = backend.model_key
        try:
            server = CsiServer(backend, endpoint)
        except ValueError as exc:
            raise SystemExit(f"nodecache: --csi-endpoint: {exc}") from None
        await server.start()
        self.csi = server

    def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await job()
                except Exception:
                    log.exception("periodic job failed", extra={"job": job.__qualname__})

        self._background.append(asyncio.create_task(loop()))

    async def _serve_metrics(self) -> NodeServer:
        """``/metrics`` on TCP, within the same transport limits: it listens on every
        address by default, so anything on the network can reach it."""

        async def metrics(_: web.Request) -> web.Response:
            body = generate_latest(REGISTRY)
            if self.pool is not None:
                body += generate_latest(await self.pool.metrics())
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        options = self.options
        server = NodeServer(
            app,
            None,
            tcp_host=options.metrics_host,
            tcp_port=options.metrics_port,
            limits=options.limits,
        )
        await server.start()
        return server

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, remove the sockets, stop workers."""
        log.info("agent stopping")
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(
            *([self._http.stop()] if self._http is not None else []),
            *([self._grpc.stop(self.options.shutdown_timeout)] if self._grpc is not None else []),
        )
        if self._metrics is not None:
            await self._metrics.stop()
        if self.csi is not None:
            await self.csi.stop()
        await self.agent.close()
        await self._dataplane.mirror.stop()
        if self.pool is not None:
            await self.pool.stop()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        log.info("agent stopped")


def _raise_open_files_limit() -> None:
    """The soft open-files limit up to the hard one: every connection, cache file and shared
    memory region holds a descriptor, and the default soft limit (1024 under containerd 2)
    runs out long before the node does. Workers, started later, inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # an unlimited hard limit, past fs.nr_open
            log.warning("open files limit stays low", extra={"soft": soft, "error": str(exc)})


async def _bind(what: str, flag: str, starting: Awaitable[T]) -> T:
    """``starting``'s result; a port in use, or a node socket another process serves,
    becomes one line for the operator instead of a traceback."""
    try:
        return await starting
    except SocketTaken as exc:
        raise SystemExit(f"nodecache: {exc}; stop it or pass another --socket-dir") from None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise SystemExit(f"nodecache: {what} is in use ({exc.strerror}); pass {flag}") from None
    except RuntimeError as exc:  # grpc says no more than this about a port it cannot bind
        if not str(exc).startswith("Failed to bind"):
            raise
        raise SystemExit(f"nodecache: {what} cannot be bound (in use?); pass {flag}") from None
