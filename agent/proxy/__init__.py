"""``nodecache proxy``: one model of the node socket on a TCP port, for KServe runtimes.

A KServe predictor container speaks to its clients on TCP and cannot be pointed at a Unix
socket. This proxy runs in that container with the node socket mounted through a
``socket: "true"`` CSI volume, and forwards Open Inference Protocol REST (V2 and KServe V1)
and gRPC to the node's warm copy, under the cache's name. Health is its own (live) and the
node's (ready: the node socket answers and the model is ready there).
"""

from __future__ import annotations

import asyncio
import logging

from nodecache.agent.proxy.grpc import GrpcProxy
from nodecache.agent.proxy.http import HttpProxy
from nodecache.agent.proxy.names import Names
from nodecache.agent.services import GRPC_SOCKET_NAME
from nodecache.agent.settings import SOCKET_NAME, ProxySettings
from nodecache.serve.loop import on_stop_signal
from nodecache.serve.relay import WorkerLink

__all__ = ["run_proxy"]

log = logging.getLogger(__name__)


async def run_proxy(settings: ProxySettings) -> None:
    """Serve until SIGTERM or SIGINT (or until cancelled)."""
    names = Names(settings.served_name or settings.model, settings.model)
    node = WorkerLink(str(settings.socket_dir / SOCKET_NAME), limit=settings.node_connections)
    http = HttpProxy(names, node, max_body=settings.max_body, limits=settings.limits)
    host, port = settings.listen
    grpc_proxy = None
    stop = asyncio.Event()
    remove = on_stop_signal(stop)
    try:
        bound = await http.start(host, port)
        listening = {"http": f"{host}:{bound}"}
        if settings.grpc_listen is not None:
            grpc_proxy = GrpcProxy(names, settings.socket_dir / GRPC_SOCKET_NAME,
                                   max_message=settings.max_body)  # fmt: skip
            grpc_host, grpc_port = settings.grpc_listen
            listening["grpc"] = f"{grpc_host}:{await grpc_proxy.start(grpc_host, grpc_port)}"
        log.info(
            "proxy listening",
            extra={"model": names.model, "served_name": names.served,
                   "socket_dir": str(settings.socket_dir), **listening},
        )  # fmt: skip
        await stop.wait()
    finally:
        remove()
        await http.stop()
        if grpc_proxy is not None:
            await grpc_proxy.stop()
