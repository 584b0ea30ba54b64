"""The Open Inference Protocol v2 over HTTP/1.1: routes, error mapping, listeners.

This module is the only place where errors become status codes. Every error
answer carries an OIP error body, ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.errors import InvalidInput, PayloadTooLarge, ServeError, excerpt
from nodecache.serve.protocol import (
    DEFAULT_MAX_ELEMENTS,
    HEADER_LENGTH,
    InferRequest,
    decode_request,
    encode_response,
    sized_work,
    tensor_bytes,
)
from nodecache.serve.routing import Caller, nobody
from nodecache.serve.tensors import decode_tensor, encode_tensor
from nodecache.serve.transport import (
    LimitedProtocol,
    TransportLimits,
    UnixListener,
    limits_middleware,
)
from nodecache.serve.triton.routes import add_routes as add_triton_routes
from nodecache.serve.triton.routes import regions_for

__all__ = [
    "CALLER",
    "DEFAULT_MAX_BODY",
    "PROTOCOL_HEADER",
    "NodeServer",
    "build_app",
    "caller_of",
    "error_response",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DATAPLANE = web.AppKey("dataplane", DataPlane)
MAX_BODY = web.AppKey("max_body", int)
MAX_ELEMENTS = web.AppKey("max_elements", int)
# Set by the agent when it forwards a gRPC call to a worker over REST, so the worker
# counts the request under the protocol the client used.
PROTOCOL_HEADER = "X-Nodecache-Protocol"
_PROTOCOLS = frozenset({"rest", "grpc", "v1", "mirror"})
# Where a middleware that can tell the caller's namespace (cluster mode) leaves it, as a
# ``routing.Caller``: asked only for names that depend on it.
CALLER = web.RequestKey[Caller]("nodecache_caller")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = {"Content-Type": "application/json"}


def error_response(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServeError as exc:
        response = error_response(exc.status, str(exc), exc.retry_after)
        if isinstance(exc, PayloadTooLarge):
            response.force_close()  # the unread body makes the connection unusable
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except Exception:
        # Our fault: the details (and any paths in them) go to the log, not to the client.
        log.exception("unhandled error", extra={"path": request.path[:200]})
        return error_response(500, "internal error")


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


def caller_of(request: web.Request) -> Caller:
    return request.get(CALLER, nobody)


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _ready(request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[DATAPLANE].server_metadata())


async def _model_metadata(request: web.Request) -> web.Response:
    dp = request.app[DATAPLANE]
    name, version = request.match_info["name"], _version(request)
    return web.json_response(await dp.model_metadata(name, version, caller_of(request)))


async def _model_ready(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if request.app[DATAPLANE].model_ready(name, _version(request), caller_of(request)):
        return web.json_response({"name": name, "ready": True})
    return error_response(400, f"model '{name}' is not ready")


async def _infer(request: web.Request) -> web.Response:
    headers = request.headers
    length_header = headers.get(HEADER_LENGTH)
    header_length = None
    if length_header is not None:
        try:
            header_length = int(length_header)
        except ValueError:
            raise InvalidInput(
                f"{HEADER_LENGTH} must be an integer, got {excerpt(length_header)}"
            ) from None
    app = request.app
    # A name the caller may not use is read and refused as an undeclared one (404 after
    # the body): refusing it sooner would tell the caller that it exists.
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = app[MAX_BODY]
        raise PayloadTooLarge(f"request body is larger than the {limit} byte limit") from None
    infer_request = await sized_work(
        len(body), decode_request, body, header_length, max_elements=app[MAX_ELEMENTS]
    )
    protocol = headers.get(PROTOCOL_HEADER, "rest")
    match_info = request.match_info
    infer = app[DATAPLANE].infer
    if infer_request.uses_shared_memory:
        infer_request.regions = await regions_for(request, app[DATAPLANE])
        infer = app[DATAPLANE].infer_shared
    result = await infer(
        match_info["name"],
        infer_request,
        match_info.get("version"),
        protocol=protocol if protocol in _PROTOCOLS else "rest",
        caller=caller_of(request),
    )
    payload, json_length = await sized_work(tensor_bytes(result.outputs), encode_response, result)
    if json_length is None:
        return web.Response(body=payload, headers=_JSON)
    return web.Response(
        body=payload,
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_length)},
    )


async def _v1_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    ready = request.app[DATAPLANE].model_ready(name, _version(request), caller_of(request))
    return web.json_response({"name": name, "ready": ready})


async def _v1_predict(request: web.Request) -> web.Response:
    """KServe V1 ``{"instances": [...]}`` for old clients: single-input models only.

    Instances are checked as strictly as V2 JSON data (same decoder); predictions are
    written as JSON with non-finite floats as null, like every JSON answer here."""
    name, version, caller = request.match_info["name"], _version(request), caller_of(request)
    dataplane = request.app[DATAPLANE]
    body = await request.read()  # even for a name the caller may not use: see _infer
    doc = await sized_work(len(body), _json_document, body)
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise InvalidInput('a V1 request is {"instances": [...]}')
    meta = await dataplane.model_metadata(name, version, caller)
    if len(meta["inputs"]) != 1:
        raise InvalidInput(f"model '{name}' takes {len(meta['inputs'])} inputs; use the V2 API")
    spec = meta["inputs"][0]
    _, array = await sized_work(
        len(body), _v1_tensor, spec, doc["instances"], request.app[MAX_ELEMENTS]
    )
    inputs = InferRequest(inputs={spec["name"]: array})
    result = await dataplane.infer(name, inputs, version, protocol="v1", caller=caller)
    first = next(iter(result.outputs.values()))
    payload = await sized_work(first.nbytes, _v1_predictions, first)
    return web.Response(body=payload, headers=_JSON)


def _json_document(body: bytes) -> Any:
    """orjson, not json: it refuses nesting past 1024 levels (json recurses until
    RecursionError) and never builds a thousand-digit integer."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


def _v1_tensor(spec: dict[str, Any], instances: list[Any], max_elements: int) -> Any:
    try:
        rows = np.array(instances, dtype=object)
    except ValueError:
        raise InvalidInput("instances must be rectangular rows") from None
    if rows.size > max_elements:
        raise InvalidInput(f"{rows.size} instance values, over the limit of {max_elements}")
    tensor = {**spec, "shape": list(rows.shape), "data": rows.ravel().tolist()}
    return decode_tensor(tensor, max_elements=max_elements)


def _v1_predictions(output: np.ndarray) -> bytes:
    if output.dtype.kind in "OSU":  # text, as V2 JSON writes BYTES
        spec, _ = encode_tensor("output", output, binary=False)
        values: Any = np.array(spec["data"], dtype=object).reshape(output.shape).tolist()
    elif output.ndim == 0:
        values = output.item()
    else:
        values = np.ascontiguousarray(output)
    return orjson.dumps({"predictions": values}, option=orjson.OPT_SERIALIZE_NUMPY)


async def _repository_index(request: web.Request) -> web.Response:
    return web.json_response(request.app[DATAPLANE].repository_index(caller_of(request)))


async def _repository_load(request: web.Request) -> web.Response:
    await request.app[DATAPLANE].load(request.match_info["name"], caller_of(request))
    return web.json_response({})


async def _repository_unload(request: web.Request) -> web.Response:
    await request.app[DATAPLANE].unload(request.match_info["name"], caller_of(request))
    return web.json_response({})


def build_app(
    dataplane: DataPlane,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> web.Application:
    """The OIP v2 REST app; callers may add routes (the agent adds its status)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body)
    app[DATAPLANE] = dataplane
    app[MAX_BODY] = max_body
    app[MAX_ELEMENTS] = max_elements
    add_triton_routes(app, dataplane, caller_of)  # first: /v2/models/stats is no model's
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    # Routes under one prefix are tried in the order they were added: infer first.
    app.router.add_post(model + "/infer", _infer)
    app.router.add_post(versioned + "/infer", _infer)
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/v2", _server_metadata)
    for base in (model, versioned):
        app.router.add_get(base, _model_metadata)
        app.router.add_get(base + "/ready", _model_ready)
    app.router.add_get("/v1/models/{name}", _v1_model)
    app.router.add_get("/v1/models/{name}/versions/{version}", _v1_model)
    app.router.add_post(r"/v1/models/{name:[^/:]+}:predict", _v1_predict)
    app.router.add_post(r"/v1/models/{name:[^/:]+}/versions/{version:[^/:]+}:predict", _v1_predict)
    app.router.add_post("/v2/repository/index", _repository_index)
    app.router.add_post("/v2/repository/models/{name}/load", _repository_load)
    app.router.add_post("/v2/repository/models/{name}/unload", _repository_unload)
    return app


class NodeServer:
    """Runs one app on the node socket (mode 0660) and, if asked, on a TCP port, within
    the transport limits (head and body deadlines, idle bound, early 413), and binds
    the socket again if its file is deleted. Without a socket path it listens on TCP only
    (the metrics port)."""

    def __init__(
        self,
        app: web.Application,
        socket_path: Path | None,
        *,
        tcp_host: str = "127.0.0.1",
        tcp_port: int | None = None,
        shutdown_timeout: float = 30.0,
        socket_group: int | None = None,
        limits: TransportLimits | None = None,
        socket_check: float = 1.0,
    ) -> None:
        self.socket_path = socket_path
        self._tcp = (tcp_host, tcp_port)
        self._limits = limits = limits or TransportLimits()
        self._socket_check = socket_check
        # Outermost, so that every route (and the router's app) gets the same limits.
        app.middlewares.insert(0, limits_middleware(limits, self.socket_present))
        self._runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
        self._unix = (
            None
            if socket_path is None
            else UnixListener(socket_path, self._protocol, group=socket_group)
        )
        self._tcp_server: asyncio.AbstractServer | None = None
        self._keeper: asyncio.Task[None] | None = None
        self.tcp_port: int | None = None

    def _protocol(self) -> LimitedProtocol:
        server = self._runner.server
        assert server is not None, "started"
        return LimitedProtocol(
            server,
            loop=asyncio.get_running_loop(),
            access_log=None,
            header_timeout=self._limits.header_timeout,
            keepalive_timeout=self._limits.keepalive_timeout,
            # After a 413 or 408 the unread body is drained this long (default 10 s) so the
            # client sees the answer rather than a reset; short, so shutdown stays quick.
            lingering_time=1.0,
        )

    def socket_present(self) -> bool:
        """Whether the node socket's file still is the one this server listens on."""
        return self._unix is None or self._unix.present()

    async def start(self) -> None:
        """Listen; on failure (a port in use) nothing is left listening."""
        await self._runner.setup()
        try:
            if self._unix is not None:
                await self._unix.bind()
            host, port = self._tcp
            if port is not None:
                self._tcp_server = await asyncio.get_running_loop().create_server(
                    self._protocol, host, port, backlog=4096
                )
                self.tcp_port = self._tcp_server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise
        if self._unix is not None:
            self._keeper = asyncio.create_task(self._unix.keep(self._socket_check))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, remove the socket file."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._unix is not None:
            self._unix.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
            self._tcp_server = None
        await self._runner.cleanup()
