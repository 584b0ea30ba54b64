"""The Open Inference Protocol when models live in workers: one dataplane for REST and gRPC.

``PoolDataPlane`` answers locally what it can (health, server metadata, the repository
index, a declared model that is not registered yet) and hands the rest to the pool's
public methods: REST requests go on as the caller sent them (``forward``), gRPC requests
cross as raw tensor bytes (the binary tensor data extension: no JSON on that hop).
``build_router_app`` is the node socket's app over it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from nodecache.serve.dataplane import (
    EXTENSIONS,
    MODEL_VERSION,
    SERVER_NAME,
    SERVER_VERSION,
    VERSION_PATTERN,
    Catalog,
)
from nodecache.serve.errors import (
    RELAYED_ANSWERS,
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    ModelNotReady,
    WorkerUnavailable,
    answered,
)
from nodecache.serve.http import PROTOCOL_HEADER, error_middleware
from nodecache.serve.pool.pool import Answer, WorkerPool
from nodecache.serve.protocol import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    decode_response,
    encode_request,
    sized_work,
    tensor_bytes,
)
from nodecache.serve.spec import ModelState
from nodecache.serve.triton.routes import REGIONS_HEADER, peer_of
from nodecache.serve.triton.routes import add_routes as add_triton_routes
from nodecache.serve.triton.shm import SharedMemory, refs_of
from nodecache.serve.triton.statistics import merge as merge_statistics

__all__ = ["PoolDataPlane", "build_router_app"]

# What crosses the relay: only the headers the worker's OIP routes read, never hop-by-hop
# ones (Expect, Connection, Transfer-Encoding, ...) nor our own X-Nodecache-* from a caller.
_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", HEADER_LENGTH.lower(), "traceparent", "tracestate", "x-request-id"}
)
_ANSWER_HEADERS = frozenset({"content-type", HEADER_LENGTH.lower(), "retry-after", "x-request-id"})
_INDEX_STATES = {ModelState.WARM: "READY", ModelState.LOADING: "LOADING"}
_MAX_BODY = 64 * 1024 * 1024


def _model_path(name: str, version: str | None) -> str:
    """``/v2/models/NAME[/versions/V]`` for a declared name and a version that can only be
    a version: nothing a gRPC caller puts in ``model_version`` can leave the path."""
    if version is None or version == "":
        return f"/v2/models/{quote(name, safe='')}"
    if not VERSION_PATTERN.fullmatch(version):
        raise InvalidInput(
            f"model version {version[:70]!r} is not a version ([A-Za-z0-9._-], at most 64)"
        )
    return f"/v2/models/{quote(name, safe='')}/versions/{version}"


def _raise_for(answer: Answer) -> None:
    """The worker's error answer as the error the gRPC servicer maps to a status code."""
    status, _, body = answer
    if status == 200:
        return
    try:
        doc = json.loads(body)
        message = str(doc.get("error", "")) if isinstance(doc, dict) else ""
    except ValueError:
        message = ""
    raise answered(status, message, RELAYED_ANSWERS)


class PoolDataPlane:
    """The OIP operations over a pool, for the REST router and the gRPC servicer alike."""

    def __init__(self, pool: WorkerPool, catalog: Catalog) -> None:
        self.pool = pool
        self.catalog = catalog
        # Held open here, read and written by the workers (REGIONS_HEADER): tensor bytes
        # never cross the agent.
        self.shared_memory = SharedMemory()

    def check(self, name: str, version: str | None = None) -> None:
        """The same 404s, 503s and 400s for names and versions as in-process."""
        if not self.pool.has(name):
            reason = self.catalog.not_ready_reason(name)
            if reason is None:
                raise ModelNotFound(name)
            raise ModelNotReady(f"model '{name}' is not ready: {reason}")
        if version:
            _model_path(name, version)  # refuses what cannot be a version
            if version != MODEL_VERSION:
                raise ModelNotFound(name, version)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.check(name, version)
        seen = self.pool.describe(name) or {}
        return seen.get("state") != ModelState.ERROR

    def index(self) -> list[dict[str, Any]]:
        """The repository index: the pool's models, then declared ones not registered."""
        entries = []
        for name in self.pool.names():
            seen = self.pool.describe(name) or {}
            state = _INDEX_STATES.get(seen.get("state", ""), "UNAVAILABLE")
            entries.append({"name": name, "version": MODEL_VERSION, "state": state,
                            "reason": seen.get("error") or ""})  # fmt: skip
        entries.extend(self.catalog.index())
        return sorted(entries, key=lambda e: e["name"])

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.check(name, version)
        answer = await self.pool.ask_home(name, "GET", _model_path(name, version), b"", [])
        _raise_for(answer)
        doc: dict[str, Any] = json.loads(answer[2])
        return doc

    async def infer(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str = "grpc",
    ) -> InferResponse:
        self.check(name, version)
        path = _model_path(name, version) + "/infer"
        size = tensor_bytes(request.inputs)
        body, json_length = await sized_work(size, encode_request, request, binary=True)
        headers = [(PROTOCOL_HEADER, protocol)]
        if json_length is not None:  # None: every input is in shared memory
            headers.append((HEADER_LENGTH, str(json_length)))
        if request.regions is not None:
            named = {r.region for r in request.shared.values()}
            named |= {o.shm.region for o in request.outputs or () if o.shm}
            headers.append(_regions_header(request.regions, named))
        answer = await self.pool.infer(name, "POST", path, body, headers)
        _raise_for(answer)
        length = next((v for k, v in answer[1] if k.lower() == HEADER_LENGTH.lower()), None)
        result = await sized_work(
            len(answer[2]), decode_response, answer[2], int(length) if length else None
        )
        result.model_name = name
        return result

    async def load(self, name: str) -> None:
        await self.pool.load(name, evict=True)

    async def unload(self, name: str) -> None:
        self.check(name)
        await self.pool.unload(name)

    async def infer_shared(
        self, name: str, request: InferRequest, version: str | None = None, *, protocol: str
    ) -> InferResponse:
        """The worker maps the caller's regions itself (``infer`` hands them over)."""
        return await self.infer(name, request, version, protocol=protocol)

    async def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The model's configuration, from its home (which has it loaded)."""
        self.check(name, version)
        path = _model_path(name, version) + "/config"
        answer = await self.pool.ask_home(name, "GET", path, b"", [])
        _raise_for(answer)
        doc: dict[str, Any] = json.loads(answer[2])
        return doc

    async def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """Every worker counts the requests it ran; the sum is the model's (or, without a
        name, every model's). A worker restarting meanwhile adds nothing."""
        if name is not None:
            self.check(name, version)
        path = "/v2/models/stats" if name is None else _model_path(name, version) + "/stats"
        reports = []
        for worker in self.pool.table.workers:
            if not worker.serving:
                continue
            with contextlib.suppress(WorkerUnavailable):
                status, _, body = await self.pool.relay(worker, name or "", "GET", path, b"", [])
                if status == 200:
                    reports.append(json.loads(body))
        return merge_statistics(reports)

    async def forward(self, request: web.Request, name: str) -> web.Response:
        """A REST request about a model, to the worker that should answer it.

        The target goes as the caller sent it (``raw_path``: the worker's router decodes
        it exactly as ours did), with only the headers the OIP routes read. HEAD goes as
        GET, whose body aiohttp then leaves out. Inference goes to the least busy copy;
        everything else (metadata, repository load and unload) to the model's home."""
        self.check(name)  # 404 before reading a body for an unknown model
        method = "GET" if request.method == "HEAD" else request.method
        if method not in ("GET", "POST"):
            raise MethodNotAllowed(f"method {request.method[:16]} is not allowed here")
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS]
        path, target = request.path, request.raw_path
        if path.endswith(("/infer", ":predict")):
            named = set()
            if path.endswith("/infer") and b"shared_memory_region" in body:  # cheap first
                named = refs_of(_json_part(body, request.headers.get(HEADER_LENGTH)))
            if named:
                caller_regions = self.shared_memory.lookup(await peer_of(request))
                headers.append(_regions_header(caller_regions, named))
            status, answer, payload = await self.pool.infer(name, method, target, body, headers)
        else:
            if path.endswith("/unload"):
                await self.pool.drop_copies(name, "the model was unloaded")
            status, answer, payload = await self.pool.ask_home(name, method, target, body, headers)
        out = CIMultiDict((k, v) for k, v in answer if k.lower() in _ANSWER_HEADERS)
        return web.Response(body=payload, status=status, headers=out)


def _json_part(body: bytes, header_length: str | None) -> dict[str, Any]:
    """A REST infer body's JSON part (the whole body without the binary extension)."""
    try:
        end = len(body) if header_length is None else int(header_length)
        doc = json.loads(body[:end])
    except ValueError:
        raise InvalidInput("the request's JSON part is not valid JSON") from None
    return doc if isinstance(doc, dict) else {}


def _regions_header(regions: Callable[[str], Any], named: set[str]) -> tuple[str, str]:
    """The regions a relayed request names, as handles its worker maps itself."""
    handles = {name: regions(name).handle() for name in sorted(named)}
    return REGIONS_HEADER, json.dumps(handles, separators=(",", ":"))


def build_router_app(dataplane: PoolDataPlane) -> web.Application:
    """The node socket's app when models live in workers (see ``PoolDataPlane``)."""

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def metadata(_: web.Request) -> web.Response:
        return web.json_response(dataplane.server_metadata())

    async def model(request: web.Request) -> web.Response:
        return await dataplane.forward(request, request.match_info["name"])

    async def index(_: web.Request) -> web.Response:
        return web.json_response(dataplane.index())

    app = web.Application(middlewares=[error_middleware], client_max_size=_MAX_BODY)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", metadata)
    add_triton_routes(app, dataplane)  # before the model routes: /v2/models/stats
    app.router.add_route("*", "/v2/models/{name}{tail:(/.*)?}", model)
    app.router.add_route("*", r"/v1/models/{name:[^/:]+}{tail:(:predict)?}", model)
    app.router.add_post("/v2/repository/index", index)
    app.router.add_post("/v2/repository/models/{name}/{verb:load|unload}", model)
    return app
