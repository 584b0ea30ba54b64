"""One multi-model server process: its own repository on one device, on private sockets.

The agent starts these (``python -I -m nodecache.serve.worker``), registers models with them
over a control API (its messages: ``serve.pool.messages``), and relays requests to them.
The two never share a channel: the OIP routes listen on the data socket, which carries
whatever a caller sent, and the control routes on a second socket, where every request
must also carry the agent's secret token (given in the environment, never on the command
line that every process on the node can read). So no byte a caller sends can register,
load or export a model. A worker exits when the agent that started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.devices import Device
from nodecache.serve.errors import ModelNotFound
from nodecache.serve.http import DATAPLANE, NodeServer, build_app, error_middleware, error_response
from nodecache.serve.logs import setup_logging
from nodecache.serve.loop import on_stop_signal, serve_forever
from nodecache.serve.metrics import SERVING_METRICS, request_counts
from nodecache.serve.pool.messages import (
    METRICS_ROUTE,
    STATUS_ROUTE,
    TOKEN_ENV,
    Load,
    Policy,
    Register,
    Weights,
    WorkerStatus,
    model_route,
)
from nodecache.serve.repository import ModelRepository
from nodecache.serve.settings import ServeSettings
from nodecache.serve.triton.routes import WORKER_REGIONS
from nodecache.serve.triton.shm import WorkerRegions

__all__ = ["build_control_app", "build_worker_app", "main", "parse_args"]

log = logging.getLogger(__name__)
REPOSITORY = web.AppKey("repository", ModelRepository)


async def _register(request: web.Request) -> web.Response:
    message = Register.from_json(request.match_info["name"], await request.json())
    request.app[REPOSITORY].register(message.spec)
    return web.json_response({})


async def _policy(request: web.Request) -> web.Response:
    message = Policy.from_json(await request.json())
    request.app[REPOSITORY].set_policy(request.match_info["name"], message.policy)
    return web.json_response({})


async def _load(request: web.Request) -> web.Response:
    message = Load.from_json(await request.json() if request.can_read_body else {})
    await request.app[REPOSITORY].load(
        request.match_info["name"], evict=message.evict, weights=message.weights
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
    return web.json_response(Weights(weights, model.loads).to_json())


async def _unload(request: web.Request) -> web.Response:
    await request.app[REPOSITORY].unload(request.match_info["name"])
    return web.json_response({})


async def _unregister(request: web.Request) -> web.Response:
    await request.app[REPOSITORY].unregister(request.match_info["name"])
    return web.json_response({})


async def _status(request: web.Request) -> web.Response:
    repository = request.app[REPOSITORY]
    status = WorkerStatus(
        pid=os.getpid(),
        models={m.name: m.to_json() for m in repository.models()},
        devices=[d.to_json() for d in repository.devices],
        requests=request_counts(),
    )
    return web.json_response(status.to_json())


_SERVING = CollectorRegistry(auto_describe=True)
for _metric in SERVING_METRICS:
    _SERVING.register(_metric)


async def _metrics(_: web.Request) -> web.Response:
    """This worker's serving metrics; the agent sums them over its workers for /metrics."""
    return web.Response(
        body=generate_latest(_SERVING), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def build_worker_app(
    repository: ModelRepository, settings: ServeSettings | None = None
) -> web.Application:
    """The data socket's app: the OIP routes and nothing else."""
    settings = settings or ServeSettings()
    app = build_app(DataPlane(repository, max_output_bytes=settings.max_output_bytes))
    assert app[DATAPLANE].repository is repository
    app[WORKER_REGIONS] = WorkerRegions()  # shared memory the agent hands over with requests
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
    model = model_route("{name}")
    app.router.add_put(model, _register)
    app.router.add_put(model_route("{name}", "policy"), _policy)
    app.router.add_post(model_route("{name}", "load"), _load)
    app.router.add_post(model_route("{name}", "unload"), _unload)
    app.router.add_get(model_route("{name}", "weights"), _weights)
    app.router.add_delete(model, _unregister)
    app.router.add_get(STATUS_ROUTE, _status)
    app.router.add_get(METRICS_ROUTE, _metrics)
    return app


async def _serve(args: argparse.Namespace) -> None:
    settings = ServeSettings.from_arguments(args)
    repository = ModelRepository(
        [Device(args.device, args.total, args.budget)],
        max_inflight_per_model=settings.model_queue,
        max_concurrency_per_model=settings.model_concurrency,
    )
    token = os.environ.pop(TOKEN_ENV, "")
    app = build_worker_app(repository, settings)
    server = NodeServer(app, Path(args.socket))
    control = NodeServer(build_control_app(repository, token), Path(args.control_socket))
    stop = asyncio.Event()
    on_stop_signal(stop)
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
            await asyncio.sleep(settings.idle_check_seconds)
            await repository.unload_idle()

    tasks = [asyncio.create_task(t()) for t in (watch_parent, unload_idle)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await server.stop()
    await control.stop()
    for model in repository.models():
        await repository.unregister(model.name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line ``Supervisor.command`` writes: sockets, device, ``ServeSettings``."""
    parser = argparse.ArgumentParser(prog="python -I -m nodecache.serve.worker")
    parser.add_argument("--socket", required=True, help="the data socket (OIP)")
    parser.add_argument("--control-socket", required=True, help="the agent's control socket")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--total", type=int, default=0)
    parser.add_argument("--budget", type=int, required=True)
    ServeSettings.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_format)
    serve_forever(_serve(args))


if __name__ == "__main__":
    main()
