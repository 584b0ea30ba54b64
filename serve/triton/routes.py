"""Triton's REST routes over either dataplane (in-process, or the pool's): model
configuration, statistics, system shared memory, and CUDA shared memory's refusal.

Added before the model routes, so ``/v2/models/stats`` is the statistics of every model
(as in Triton), not the metadata of a model named "stats".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from aiohttp import web

from nodecache.serve.errors import CallerUnknown, InvalidInput, Unimplemented
from nodecache.serve.peers import Peer, connection_peer
from nodecache.serve.protocol import InferRequest, InferResponse
from nodecache.serve.routing import Caller, nobody
from nodecache.serve.triton.shm import RequestRegions, SharedMemory, WorkerRegions, open_region

__all__ = [
    "REGIONS_HEADER",
    "WORKER_REGIONS",
    "TritonOperations",
    "add_routes",
    "peer_of",
    "regions_for",
]

REGIONS_HEADER = "X-Nodecache-Regions"
"""Set by the agent on a request it relays to a worker: the caller's regions the request
names, as handles the worker opens itself (``shm.RegionFile.handle``). Read only by workers."""
WORKER_REGIONS = web.AppKey("worker_regions", WorkerRegions)
"""On a worker's data app only: the regions the agent handed it."""


class TritonOperations(Protocol):
    """What both dataplanes answer for these routes."""

    shared_memory: SharedMemory

    async def model_config(
        self, name: str, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]: ...

    async def model_statistics(
        self, name: str | None = None, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]: ...

    async def infer_shared(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str,
        caller: Caller = nobody,
    ) -> InferResponse: ...


async def peer_of(request: web.Request) -> Peer:
    """The process that sent ``request`` (its socket's peer, checked again now): 403 if the
    kernel cannot say, 403 "reconnect" once that process is gone."""
    caller = connection_peer(request.protocol, request.transport, find=False)  # cheap
    if caller is None:
        caller = await asyncio.to_thread(connection_peer, request.protocol, request.transport)
    if caller is None:
        raise CallerUnknown(
            "shared memory is the calling process's own, and this connection does not say "
            "which process calls: use the node socket, or TCP on loopback"
        )
    return caller


async def regions_for(request: web.Request, dataplane: TritonOperations) -> RequestRegions:
    """The regions an infer request may name: on a worker, those the agent handed over
    with it; elsewhere, the caller's own. The dataplane's ``infer_shared`` closes them."""
    regions = request.app.get(WORKER_REGIONS)
    if regions is not None:
        try:
            handles = json.loads(request.headers.get(REGIONS_HEADER, "{}"))
        except ValueError:
            raise InvalidInput(f"{REGIONS_HEADER} is not JSON") from None
        return regions.lookup(handles if isinstance(handles, dict) else {})
    return dataplane.shared_memory.lookup(await peer_of(request))


def add_routes(
    app: web.Application,
    dataplane: TritonOperations,
    caller_of: Callable[[web.Request], Caller],
) -> None:
    """The routes, on ``app``; ``caller_of`` gives a request's namespace for the routing
    (which versions of a name the caller sees)."""

    async def config(request: web.Request) -> web.Response:
        info = request.match_info
        config = await dataplane.model_config(info["name"], info.get("version"), caller_of(request))
        return web.json_response(config)

    async def statistics(request: web.Request) -> web.Response:
        info = request.match_info
        report = await dataplane.model_statistics(
            info.get("name"), info.get("version"), caller_of(request)
        )
        return web.json_response(report)

    async def shm_register(request: web.Request) -> web.Response:
        caller = await peer_of(request)
        try:
            doc = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidInput('a registration is {"key": ..., "offset": ..., "byte_size": ...}')
        region = await asyncio.to_thread(
            open_region, caller, request.match_info["region"], doc.get("key"),
            doc.get("offset", 0), doc.get("byte_size"),
        )  # fmt: skip
        dataplane.shared_memory.add(region)
        return web.json_response({})

    async def shm_unregister(request: web.Request) -> web.Response:
        caller = await peer_of(request)
        dataplane.shared_memory.unregister(caller, request.match_info.get("region"))
        return web.json_response({})

    async def shm_status(request: web.Request) -> web.Response:
        caller = await peer_of(request)
        regions = dataplane.shared_memory.status(caller, request.match_info.get("region"))
        return web.json_response(regions)

    async def cuda(_: web.Request) -> web.Response:
        raise Unimplemented("CUDA shared memory is not served by nodecache (yet)")

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2/models/stats", statistics)
    for base in (model, versioned):
        app.router.add_get(base + "/config", config)
        app.router.add_get(base + "/stats", statistics)
    shm, region = "/v2/systemsharedmemory", "/v2/systemsharedmemory/region/{region}"
    app.router.add_get(shm + "/status", shm_status)
    app.router.add_get(region + "/status", shm_status)
    app.router.add_post(region + "/register", shm_register)
    app.router.add_post(region + "/unregister", shm_unregister)
    app.router.add_post(shm + "/unregister", shm_unregister)
    app.router.add_route("*", "/v2/cudasharedmemory{tail:(/.*)?}", cuda)
