"""One multi-model server process: its own repository on one device, on private sockets.

The agent starts these (``python -I -m nodecache.serve.worker``), registers models with them over a
control API, and relays requests to them. The two never share a channel: the OIP routes
listen on the data socket, which carries whatever a caller sent, and the control routes on
a second socket, where every request must also carry the agent's secret token (given in
the environment, never on the command line that every process on the node can read). So
no byte a caller sends can register, load or export a model.
A worker exits when the agent that started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from nodecache.serve.dataplane import DEFAULT_MAX_OUTPUT_BYTES, DataPlane
from nodecache.serve.devices import Device
from nodecache.serve.errors import ModelNotFound
from nodecache.serve.http import DATAPLANE, NodeServer, build_app, error_middleware, error_response
from nodecache.serve.logs import setup_logging
from nodecache.serve.loop import serve_forever
from nodecache.serve.metrics import SERVING_METRICS, request_counts
from nodecache.serve.repository import ModelRepository

__all__ = ["CONTROL", "TOKEN_ENV", "build_control_app", "build_worker_app", "main"]

log = logging.getLogger(__name__)
CONTROL = "/nodecache/v1/worker"
TOKEN_ENV = "NODECACHE_WORKER_TOKEN"
"""The environment variable that hands a worker the agent's control token."""
REPOSITORY = web.AppKey("repository", ModelRepository)


def _batching(body: dict[str, Any]) -> tuple[int, float] | None:
    raw = body.get("batching")
    return (int(raw[0]), float(raw[1])) if raw else None


async def _register(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    request.app[REPOSITORY].register(
        request.match_info["name"],
        Path(body["path"]),
        body["format"],
        entrypoint=body.get("entrypoint"),
        pinned=bool(body.get("pinned", False)),
        idle_timeout=body.get("idleTimeout"),
        size_hint=body.get("sizeHint"),
        batching=_batching(body),
        on_demand=bool(body.get("onDemand", True)),
    )
    return web.json_response({})


async def _policy(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    model = request.app[REPOSITORY].get(request.match_info["name"])
    if model is not None:
        model.pinned, model.idle_timeout = bool(body["pinned"]), body.get("idleTimeout")
        model.batching = _batching(body)
    return web.json_response({})


async def _load(request: web.Request) -> web.Response:
    evict = request.query.get("evict", "1") != "0"
    body = await request.json() if request.can_read_body else {}
    await request.app[REPOSITORY].load(
        request.match_info["name"], evict=evict, weights=body.get("weights")
    )
    return web.json_response({})


async def _weights(request: web.Request) -> web.Response:
    """The warm model's weights as handles another worker on this device can attach to."""
    name = request.match_info["name"]
    model = request.app[REPOSITORY].get(name)
    if model is None:
        raise ModelNotFound(name)
    export = getattr(model.runtime, "export_weights", None)
    if export is None:
        return error_response(409, f"model '{name}' is not warm, or its runtime cannot share")
    try:
        weights = await asyncio.to_thread(export)
    except ValueError as exc:  # NotShareable: CPU weights are shared by the page cache
        return error_response(409, str(exc))
    # The load count tells the pool later whether these are still the weights it holds.
    return web.json_response({"weights": weights, "loads": model.loads})


async def _unload(request: web.Request) -> web.Response:
    await request.app[REPOSITORY].unload(request.match_info["name"])
    return web.json_response({})


async def _unregister(request: web.Request) -> web.Response:
    await request.app[REPOSITORY].unregister(request.match_info["name"])
    return web.json_response({})


async def _status(request: web.Request) -> web.Response:
    repository = request.app[REPOSITORY]
    return web.json_response(
        {
            "pid": os.getpid(),
            "models": {m.name: m.to_json() for m in repository.models()},
            "devices": [d.to_json() for d in repository.devices],
            "requests": request_counts(),
        }
    )


_SERVING = CollectorRegistry(auto_describe=True)
for _metric in SERVING_METRICS:
    _SERVING.register(_metric)


async def _metrics(_: web.Request) -> web.Response:
    """This worker's serving metrics; the agent sums them over its workers for /metrics."""
    return web.Response(
        body=generate_latest(_SERVING), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def build_worker_app(
    repository: ModelRepository, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
) -> web.Application:
    """The data socket's app: the OIP routes and nothing else."""
    app = build_app(DataPlane(repository, max_output_bytes=max_output_bytes))
    assert app[DATAPLANE].repository is repository
    return app


def _authenticated(token: str) -> web.Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return error_response(403, "control calls need the agent's token")
        return await handler(request)

    return check


def build_control_app(repository: ModelRepository, token: str) -> web.Application:
    """The control socket's app: what only the agent may ask, each call authenticated."""
    if not token:
        raise ValueError("a worker needs a control token")
    app = web.Application(middlewares=[_authenticated(token), error_middleware])
    app[REPOSITORY] = repository
    app.router.add_put(CONTROL + "/models/{name}", _register)
    app.router.add_put(CONTROL + "/models/{name}/policy", _policy)
    app.router.add_post(CONTROL + "/models/{name}/load", _load)
    app.router.add_post(CONTROL + "/models/{name}/unload", _unload)
    app.router.add_get(CONTROL + "/models/{name}/weights", _weights)
    app.router.add_delete(CONTROL + "/models/{name}", _unregister)
    app.router.add_get(CONTROL + "/status", _status)
    app.router.add_get(CONTROL + "/metrics", _metrics)
    return app


async def _serve(args: argparse.Namespace) -> None:
    repository = ModelRepository(
        [Device(args.device, args.total, args.budget)],
        max_inflight_per_model=args.model_queue,
        max_concurrency_per_model=args.model_concurrency,
    )
    token = os.environ.pop(TOKEN_ENV, "")
    server = NodeServer(
        build_worker_app(repository, max_output_bytes=args.max_output_bytes), Path(args.socket)
    )
    control = NodeServer(build_control_app(repository, token), Path(args.control_socket))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await control.start()  # last: once the agent's first call answers, both are up
    parent = os.getppid()

    async def watch_parent() -> None:
        # Orphaned workers would hold memory forever: leave with the agent.
        while os.getppid() == parent:
            await asyncio.sleep(1)
        log.error("agent gone, worker exiting")
        stop.set()

    async def unload_idle() -> None:
        while True:
            await asyncio.sleep(args.idle_check_seconds)
            await repository.unload_idle()

    tasks = [asyncio.create_task(watch_parent()), asyncio.create_task(unload_idle())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await server.stop()
    await control.stop()
    for model in repository.models():
        await repository.unregister(model.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -I -m nodecache.serve.worker")
    parser.add_argument("--socket", required=True, help="the data socket (OIP)")
    parser.add_argument("--control-socket", required=True, help="the agent's control socket")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--total", type=int, default=0)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--idle-check-seconds", type=float, default=5.0)
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--model-concurrency", type=int, default=4)
    parser.add_argument("--model-queue", type=int, default=256)
    parser.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES)
    args = parser.parse_args(argv)
    setup_logging(args.log_format)
    serve_forever(_serve(args))


if __name__ == "__main__":
    main()
