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
from random import random
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
from aiohttp import web
from multidict import CIMultiDict

from nodecache.serve.dataplane import (
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    Catalog,
    check_version,
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
from nodecache.serve.http import PROTOCOL_HEADER, caller_of, error_middleware
from nodecache.serve.mirror import Mirror, Outputs
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
from nodecache.serve.routing import Caller, Route, Router, nobody
from nodecache.serve.spec import ModelState
from nodecache.serve.triton.config import version_policy
from nodecache.serve.triton.routes import REGIONS_HEADER, peer_of
from nodecache.serve.triton.routes import add_routes as add_triton_routes
from nodecache.serve.triton.shm import RequestRegions, SharedMemory, refs_of
from nodecache.serve.triton.statistics import merge as merge_statistics
from nodecache.serve.triton.statistics import statistics_routes

__all__ = ["PoolDataPlane", "build_router_app"]

# What crosses the relay: only the headers the worker's OIP routes read, never hop-by-hop
# ones (Expect, Connection, Transfer-Encoding, ...) nor our own X-Nodecache-* from a caller.
_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", HEADER_LENGTH.lower(), "traceparent", "tracestate", "x-request-id"}
)
_ANSWER_HEADERS = frozenset({"content-type", HEADER_LENGTH.lower(), "retry-after", "x-request-id"})
_INDEX_STATES = {ModelState.WARM: "READY", ModelState.LOADING: "LOADING"}
_MAX_BODY = 64 * 1024 * 1024


def _model_path(key: str) -> str:
    """``/v2/models/KEY`` of the model that answers: a worker serves each model under its
    key (quoted: a namespaced key holds a "/"), in the version the agent chose."""
    return f"/v2/models/{quote(key, safe='')}"


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


def _header(answer: Answer, name: str) -> str | None:
    return next((v for k, v in answer[1] if k.lower() == name.lower()), None)


async def _decoded(answer: Answer) -> Outputs:
    """The outputs of a worker's 200 answer to an OIP v2 inference."""
    _raise_for(answer)
    length = _header(answer, HEADER_LENGTH)
    result = await sized_work(
        len(answer[2]), decode_response, answer[2], int(length) if length else None
    )
    return result.outputs


async def _predictions(answer: Answer) -> Outputs:
    """The predictions of a worker's 200 answer to a V1 ``:predict``, as one output."""
    _raise_for(answer)
    doc = await sized_work(len(answer[2]), json.loads, answer[2])
    return {"predictions": np.asarray(doc["predictions"])}


class PoolDataPlane:
    """The OIP operations over a pool, for the REST router and the gRPC servicer alike."""

    def __init__(
        self,
        pool: WorkerPool,
        catalog: Catalog,
        router: Router | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.pool = pool
        self.catalog = catalog
        self.router = router or Router()
        self.mirror = mirror or Mirror()
        # Held open here, read and written by the workers (REGIONS_HEADER): tensor bytes
        # never cross the agent.
        self.shared_memory = SharedMemory()

    def _state_of(self, key: str) -> ModelState | None:
        if not self.pool.has(key):
            return None
        state = (self.pool.describe(key) or {}).get("state")
        return ModelState(state) if state in _STATES else ModelState.DOWNLOADED

    def resolve(self, name: str, version: str | None, caller: Caller) -> Route:
        """The same 404s, 503s and 400s for names and versions as in-process, and the
        version that answers (chosen by weight when none is named)."""
        check_version(version)
        return self.router.table.choose(
            name, version, caller, self._state_of, random(), self.catalog.not_ready_reason
        )

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None, caller: Caller = nobody) -> bool:
        route = self.resolve(name, version, caller)
        return self._state_of(route.key) != ModelState.ERROR

    def index(self, caller: Caller = nobody) -> list[dict[str, Any]]:
        """The repository index: every version the caller may use, by served name."""
        entries = []
        for route in self.router.table.visible(caller):
            seen = self.pool.describe(route.key) if self.pool.has(route.key) else None
            if seen is None:
                state, reason = "UNAVAILABLE", self.catalog.not_ready_reason(route.key) or ""
            else:
                state = _INDEX_STATES.get(seen.get("state", ""), "UNAVAILABLE")
                reason = seen.get("error") or ""
            entries.append({"name": route.name, "version": route.version, "state": state,
                            "reason": reason})  # fmt: skip
        return entries

    def _versions(self, name: str, caller: Caller) -> list[str]:
        return [r.version for r in self.router.table.versions(name, caller)]

    async def model_metadata(
        self, name: str, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]:
        check_version(version)
        key = self.router.table.main(name, version, caller, self._state_of).key
        answer = await self.pool.ask_home(key, "GET", _model_path(key), b"", [])
        _raise_for(answer)
        doc: dict[str, Any] = json.loads(answer[2])
        doc["versions"] = self._versions(name, caller)
        return doc

    async def infer(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str = "grpc",
        caller: Caller = nobody,
    ) -> InferResponse:
        check_version(version)
        self.router.table.versions(name, caller)  # 404 before any encoding
        size = tensor_bytes(request.inputs)
        body, json_length = await sized_work(size, encode_request, request, binary=True)
        headers = [(PROTOCOL_HEADER, protocol)]
        if json_length is not None:  # None: every input is in shared memory
            headers.append((HEADER_LENGTH, str(json_length)))
        shared = request.regions is not None
        if shared:
            named = {r.region for r in request.shared.values()}
            named |= {o.shm.region for o in request.outputs or () if o.shm}
            headers.append(_regions_header(request.regions, named))
        # Chosen with no await before the relay counts it: a version being removed is
        # drained of exactly the requests it was given.
        route = self.resolve(name, version, caller)
        answer = await self.pool.infer(
            route.key, "POST", _model_path(route.key) + "/infer", body, headers
        )
        _raise_for(answer)
        if version is None and not shared:  # a copy must not write the caller's memory
            self._mirror(name, route, caller, body, headers, answer)
        length = _header(answer, HEADER_LENGTH)
        result = await sized_work(
            len(answer[2]), decode_response, answer[2], int(length) if length else None
        )
        return result  # the worker names the served name and version

    def _mirror(
        self,
        name: str,
        primary: Route,
        caller: Caller,
        body: bytes,
        headers: list[tuple[str, str]],
        answer: Answer,
        *,
        v1: bool = False,
    ) -> None:
        """Copies of an answered inference (OIP v2, or V1 ``:predict``) to the name's
        mirrors, sent as the caller sent it; the answers are compared later."""
        table = self.router.table
        if answer[0] != 200 or not table.has_mirrors(name):
            return
        mirrored = [(k, v) for k, v in headers if k != PROTOCOL_HEADER] + [
            (PROTOCOL_HEADER, "mirror")
        ]
        decode = _predictions if v1 else _decoded
        for route in table.mirrors(name, primary, caller, random):
            quoted = quote(route.key, safe="")
            path = f"/v1/models/{quoted}:predict" if v1 else _model_path(route.key) + "/infer"

            async def send(key: str = route.key, path: str = path) -> Outputs:
                if not self.pool.has(key):
                    raise ModelNotFound(key)
                return await decode(await self.pool.infer(key, "POST", path, body, mirrored))

            self.mirror.offer(route, send, lambda: decode(answer))

    def _keys(self, name: str, caller: Caller) -> list[str]:
        keys = [r.key for r in self.router.table.versions(name, caller) if self.pool.has(r.key)]
        if not keys:
            raise ModelNotReady(f"no version of model '{name}' is ready yet")
        return keys

    async def load(self, name: str, caller: Caller = nobody) -> None:
        for key in self._keys(name, caller):
            await self.pool.load(key, evict=True)

    async def unload(self, name: str, caller: Caller = nobody) -> None:
        for key in self._keys(name, caller):
            await self.pool.unload(key)

    # -- Triton's extensions (serve/triton/) ------------------------------------------

    async def infer_shared(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str,
        caller: Caller = nobody,
    ) -> InferResponse:
        """The worker reads and writes the caller's regions itself (``infer`` hands them
        over); our descriptors of them stay open until its answer."""
        regions = request.regions
        assert isinstance(regions, RequestRegions), "the transport names the caller's regions"
        with regions:
            return await self.infer(name, request, version, protocol=protocol, caller=caller)

    async def model_config(
        self, name: str, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]:
        """The configuration of the version metadata describes, from its home worker."""
        check_version(version)
        key = self.router.table.main(name, version, caller, self._state_of).key
        answer = await self.pool.ask_home(key, "GET", _model_path(key) + "/config", b"", [])
        _raise_for(answer)
        doc: dict[str, Any] = json.loads(answer[2])
        doc["version_policy"] = version_policy(self._versions(name, caller))
        return doc

    async def model_statistics(
        self, name: str | None = None, version: str | None = None, caller: Caller = nobody
    ) -> dict[str, Any]:
        """Every worker counts the requests it ran (a model's home and its copies); the
        sum, per version, is the name's. A worker restarting meanwhile adds nothing."""
        check_version(version)
        routes = statistics_routes(self.router.table, name, version, caller)
        reports = []
        for route in routes:
            if not self.pool.has(route.key):
                continue
            path = _model_path(route.key) + "/stats"
            for worker in self.pool.table.workers:
                if not worker.serving:
                    continue
                with contextlib.suppress(WorkerUnavailable):
                    status, _, body = await self.pool.relay(worker, route.key, "GET", path, b"", [])
                    if status == 200:
                        reports.append(json.loads(body))
        return merge_statistics(reports)

    async def forward(self, request: web.Request, name: str) -> web.Response:
        """A REST request about a served name, to the worker of the version that answers.

        The target is rewritten to the chosen model's key (the worker knows no versions;
        its answers carry the served name and version themselves), with only the headers
        the OIP routes read. HEAD goes as GET, whose body aiohttp then leaves out.
        Inference goes to the least busy copy; everything else (metadata, repository load
        and unload) to the model's home."""
        caller = caller_of(request)
        self.router.table.versions(name, caller)  # 404 before reading a body
        method = "GET" if request.method == "HEAD" else request.method
        if method not in ("GET", "POST"):
            raise MethodNotAllowed(f"method {request.method[:16]} is not allowed here")
        version, rest = _split(request)
        check_version(version)
        if rest == "/ready" or (request.path.startswith("/v1/") and method == "GET"):
            ready = self.model_ready(name, version, caller)
            if ready or request.path.startswith("/v1/"):
                return web.json_response({"name": name, "ready": ready})
            return web.json_response({"error": f"model '{name}' is not ready"}, status=400)
        if rest in ("/load", "/unload"):
            await (self.load if rest == "/load" else self.unload)(name, caller)
            return web.json_response({})
        if method == "GET" and rest == "":
            return web.json_response(await self.model_metadata(name, version, caller))
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS]
        named: set[str] = set()  # shared memory regions: read and written by the worker
        if rest == "/infer" and b"shared_memory_region" in body:  # cheap first
            named = await _regions_named(body, request.headers.get(HEADER_LENGTH))
        regions = self.shared_memory.lookup(await peer_of(request)) if named else None
        if regions is not None:
            headers.append(_regions_header(regions, named))
        route = self.resolve(name, version, caller)  # no await until the relay counts it
        target = _target(request, route.key, rest)
        try:  # our descriptors of the regions stay open until the worker answers
            status, answer, payload = await self.pool.infer(
                route.key, method, target, body, headers
            )
        finally:
            if regions is not None:
                regions.close()
        if version is None and rest in ("/infer", ":predict") and not named:
            relayed = (status, answer, payload)
            self._mirror(name, route, caller, body, headers, relayed, v1=rest == ":predict")
        out = CIMultiDict((k, v) for k, v in answer if k.lower() in _ANSWER_HEADERS)
        return web.Response(body=payload, status=status, headers=out)


_STATES = frozenset(state.value for state in ModelState)


def _split(request: web.Request) -> tuple[str | None, str]:
    """(the version a request names, what follows the name and version in its path), read
    from the raw path: a decoded "%2F" in a version must not move the split."""
    if request.path.startswith("/v2/repository/"):
        return None, "/" + request.match_info["verb"]
    raw = request.raw_path.partition("?")[0]
    v1 = raw.startswith("/v1/")
    after = raw[len("/v1/models/") :]  # both prefixes are as long
    cut = min((i for i in (after.find("/"), after.find(":") if v1 else -1) if i >= 0), default=-1)
    tail = after[cut:] if cut >= 0 else ""
    if not tail.startswith("/versions/"):
        return None, tail
    version, rest = tail[len("/versions/") :], ""
    for separator in (":", "/") if v1 else ("/",):
        if separator in version:
            version, sep, rest = version.partition(separator)
            rest = sep + rest
            break
    return unquote(version), rest


def _target(request: web.Request, key: str, rest: str) -> str:
    """The worker's target: the same operation on the chosen model, query kept."""
    quoted = quote(key, safe="")
    base = f"/v1/models/{quoted}" if request.path.startswith("/v1/") else f"/v2/models/{quoted}"
    query = request.raw_path.partition("?")[2]
    return base + rest + (f"?{query}" if query else "")


async def _regions_named(body: bytes, header_length: str | None) -> set[str]:
    """The shared memory regions a REST infer body names; its JSON (up to the body limit,
    and no registration needed to send it) parsed off the event loop when large."""
    return await sized_work(len(body), lambda: refs_of(_json_part(body, header_length)))


def _json_part(body: bytes, header_length: str | None) -> dict[str, Any]:
    """A REST infer body's JSON part (the whole body without the binary extension)."""
    try:
        end = len(body) if header_length is None else int(header_length)
        doc = json.loads(body[:end])
    except ValueError:
        raise InvalidInput("the request's JSON part is not valid JSON") from None
    return doc if isinstance(doc, dict) else {}


def _regions_header(regions: Callable[[str], Any], named: set[str]) -> tuple[str, str]:
    """The regions a relayed request names, as handles its worker opens itself."""
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

    async def index(request: web.Request) -> web.Response:
        return web.json_response(dataplane.index(caller_of(request)))

    app = web.Application(middlewares=[error_middleware], client_max_size=_MAX_BODY)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", metadata)
    add_triton_routes(app, dataplane, caller_of)  # before the model routes: /v2/models/stats
    app.router.add_route("*", "/v2/models/{name}{tail:(/.*)?}", model)
    app.router.add_route(
        "*", r"/v1/models/{name:[^/:]+}{tail:(?:/versions/[^/:]+)?(?::predict)?}", model
    )
    app.router.add_post("/v2/repository/index", index)
    app.router.add_post("/v2/repository/models/{name}/{verb:load|unload}", model)
    return app
