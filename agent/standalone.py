"""Standalone mode: one machine, declarations from a folder, the node socket for clients."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.files import DeclarationFolder
from agent.node import NodeAgent
from cache import ModelStore
from serve.dataplane import DataPlane
from serve.devices import discover_devices
from serve.host import LocalHost
from serve.http import NodeServer, build_app
from serve.repository import ModelRepository

__all__ = ["SOCKET_NAME", "AgentOptions", "run_standalone"]

log = logging.getLogger(__name__)
SOCKET_NAME = "nodecache.sock"
STATUS_PATH = "/nodecache/v1/status"


@dataclass(frozen=True)
class AgentOptions:
    declarations: Path
    cache_dir: Path
    socket_dir: Path
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    metrics_port: int | None = 9464
    metrics_host: str = "0.0.0.0"
    shutdown_timeout: float = 30.0
    cpu_memory_budget: int | None = None
    idle_check_seconds: float = 5.0


async def run_standalone(options: AgentOptions, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down cleanly."""
    if not options.declarations.is_dir():
        raise SystemExit(f"declarations folder {options.declarations} does not exist")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    store = ModelStore(options.cache_dir)
    kept = await asyncio.to_thread(store.scan)
    log.info("cache scanned", extra={"dir": str(options.cache_dir), "models": len(kept)})
    devices = discover_devices(cpu_budget=options.cpu_memory_budget)
    log.info("devices", extra={"devices": [d.to_json() for d in devices]})
    repository = ModelRepository(devices)
    agent = NodeAgent(store, LocalHost(repository))
    app = build_app(DataPlane(repository, catalog=agent))
    app.router.add_get(STATUS_PATH, lambda _: _status_response(agent))
    server = NodeServer(
        app,
        options.socket_dir / SOCKET_NAME,
        tcp_host=options.http_host,
        tcp_port=options.http_port,
        shutdown_timeout=options.shutdown_timeout,
    )
    await server.start()
    metrics = await _start_metrics(options)
    log.info(
        "agent started",
        extra={
            "mode": "standalone",
            "socket": str(server.socket_path),
            "http_port": server.tcp_port,
            "metrics_port": options.metrics_port,
            "declarations": str(options.declarations),
        },
    )
    background = [
        asyncio.create_task(_follow(DeclarationFolder(options.declarations), agent)),
        asyncio.create_task(_unload_idle(repository, options.idle_check_seconds)),
    ]
    try:
        await stop.wait()
    finally:
        log.info("agent stopping")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await server.stop()  # stop accepting, finish in-flight requests, remove socket
        if metrics is not None:
            await metrics.cleanup()
        await agent.close()
        log.info("agent stopped")


async def _follow(folder: DeclarationFolder, agent: NodeAgent) -> None:
    first = True
    async for snapshot in folder.watch():
        await agent.apply(snapshot.declarations, origins=snapshot.origins, errors=snapshot.errors)
        if first and not snapshot.errors:
            # Only when every file parsed: a typo must not cost a re-download.
            await agent.collect_garbage()
        first = False


async def _unload_idle(repository: ModelRepository, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        await repository.unload_idle()


def _status_response(agent: NodeAgent) -> web.Response:
    return web.json_response(agent.status())


async def _start_metrics(options: AgentOptions) -> web.AppRunner | None:
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
