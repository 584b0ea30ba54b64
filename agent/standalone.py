"""Standalone mode: one machine, declarations from a folder, the node socket for clients."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from agent.files import DeclarationFolder
from agent.node import NodeAgent
from cache import ModelStore
from serve.dataplane import DataPlane
from serve.devices import discover_devices
from serve.grpc.server import GrpcServer
from serve.host import LocalHost
from serve.http import NodeServer, build_app
from serve.repository import ModelRepository
from serve.workers import PoolDataPlane, WorkerPool, build_router_app, worker_devices

__all__ = ["SOCKET_NAME", "AgentOptions", "run_standalone"]

log = logging.getLogger(__name__)
SOCKET_NAME = "nodecache.sock"
GRPC_SOCKET_NAME = "nodecache-grpc.sock"
STATUS_PATH = "/nodecache/v1/status"


@dataclass(frozen=True)
class AgentOptions:
    declarations: Path
    cache_dir: Path
    socket_dir: Path
    http_port: int | None = None
    grpc_port: int | None = None
    http_host: str = "127.0.0.1"
    metrics_port: int | None = 9464
    metrics_host: str = "0.0.0.0"
    shutdown_timeout: float = 30.0
    cpu_memory_budget: int | None = None
    workers: int | None = None
    cache_size: int | None = None
    socket_group: int | None = None
    model_concurrency: int = 4
    model_queue: int = 256
    log_format: str = "text"
    idle_check_seconds: float = 5.0


async def run_standalone(options: AgentOptions, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down cleanly."""
    if not options.declarations.is_dir():
        raise SystemExit(f"declarations folder {options.declarations} does not exist")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    store = ModelStore(options.cache_dir, limit_bytes=options.cache_size)
    kept = await asyncio.to_thread(store.scan)
    log.info("cache scanned", extra={"dir": str(options.cache_dir), "models": len(kept)})
    devices = discover_devices(cpu_budget=options.cpu_memory_budget)
    log.info("devices", extra={"devices": [d.to_json() for d in devices]})
    pool: WorkerPool | None = None
    background: list[asyncio.Task[None]] = []
    if options.workers or any(d.kind == "cuda" for d in devices):
        pool = WorkerPool(
            worker_devices(devices, options.workers),
            options.socket_dir,
            log_format=options.log_format,
            model_concurrency=options.model_concurrency,
            model_queue=options.model_queue,
        )
        await pool.start()
        agent = NodeAgent(store, pool)
        app = build_router_app(pool, agent)
        dataplane: DataPlane | PoolDataPlane = PoolDataPlane(pool, agent)
        background.append(asyncio.create_task(_every(1.0, pool.refresh_all)))
    else:
        # One CPU server: serve in this process, no hop between the socket and the model.
        repository = ModelRepository(
            devices,
            max_inflight_per_model=options.model_queue,
            max_concurrency_per_model=options.model_concurrency,
        )
        agent = NodeAgent(store, LocalHost(repository))
        dataplane = DataPlane(repository, catalog=agent)
        app = build_app(dataplane)
        background.append(
            asyncio.create_task(_every(options.idle_check_seconds, repository.unload_idle))
        )
    app.router.add_get(STATUS_PATH, lambda _: _status_response(agent))
    server = NodeServer(
        app,
        options.socket_dir / SOCKET_NAME,
        tcp_host=options.http_host,
        tcp_port=options.http_port,
        shutdown_timeout=options.shutdown_timeout,
        socket_group=options.socket_group,
    )
    grpc_server = GrpcServer(
        dataplane,  # type: ignore[arg-type]  # both answer what the servicer asks
        options.socket_dir / GRPC_SOCKET_NAME,
        tcp_host=options.http_host,
        tcp_port=options.grpc_port,
        socket_group=options.socket_group,
    )
    await server.start()
    await grpc_server.start()
    metrics = await _start_metrics(options, pool.metrics_dir if pool else None)
    log.info(
        "agent started",
        extra={
            "mode": "standalone",
            "socket": str(server.socket_path),
            "http_port": server.tcp_port,
            "grpc_socket": str(grpc_server.socket_path),
            "grpc_port": grpc_server.tcp_port,
            "metrics_port": options.metrics_port,
            "declarations": str(options.declarations),
        },
    )
    background.append(asyncio.create_task(_follow(DeclarationFolder(options.declarations), agent)))
    try:
        await stop.wait()
    finally:
        log.info("agent stopping")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Stop accepting, finish in-flight requests, remove the sockets.
        await asyncio.gather(server.stop(), grpc_server.stop(options.shutdown_timeout))
        if metrics is not None:
            await metrics.cleanup()
        await agent.close()
        if pool is not None:
            await pool.stop()
        log.info("agent stopped")


async def _follow(folder: DeclarationFolder, agent: NodeAgent) -> None:
    first = True
    async for snapshot in folder.watch():
        await agent.apply(snapshot.declarations, origins=snapshot.origins, errors=snapshot.errors)
        if first and not snapshot.errors:
            # Only when every file parsed: a typo must not cost a re-download.
            await agent.collect_garbage()
        first = False


async def _every(seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        await job()


def _status_response(agent: NodeAgent) -> web.Response:
    return web.json_response(agent.status())


async def _start_metrics(
    options: AgentOptions, multiprocess_dir: Path | None
) -> web.AppRunner | None:
    if not options.metrics_port:
        return None
    registry = REGISTRY
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(multiprocess_dir))

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, options.metrics_host, options.metrics_port).start()
    return runner
