"""The servers serve.py measures, started and stopped: ours (agent, in-process or with
workers), the proxy in front of it, the bare handler, MLServer and KServe (their code in
_serve_peers.py), each with the endpoints a load generator is pointed at.

Every server runs in a process group of its own, so stopping it stops its children too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from _common import ROOT, ensure_venv

__all__ = ["MODEL", "Endpoint", "Server", "request", "run_ours_from", "servers_up", "start_ours"]

HERE = Path(__file__).resolve().parent
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
MODEL = "mlp"
INFER_PATH = f"/v2/models/{MODEL}/infer"
PROXY_NAME = "mlp-isvc"  # the InferenceService's name the proxy maps to MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Endpoint:
    label: str
    url: str  # http://host:port or http://localhost (with socket)
    socket: Path | None = None
    root_pid: int | None = None  # the server's first process, for CPU accounting
    also_pids: list[int] = field(default_factory=list)  # more process trees its requests use
    path: str = INFER_PATH


@dataclass
class Server:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    pid: int | None = None  # the process that answers (profiled with its children)
    grpc_url: str | None = None  # host:port of its gRPC on TCP, if asked

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


# The nodecache source tree ours runs from (--tree): a clean export of a commit keeps the
# numbers independent of whatever is being edited in the working tree.
TREE = ROOT


def run_ours_from(tree: Path) -> None:
    """Start ours (and the proxy) from ``tree`` instead of this checkout."""
    global TREE
    TREE = tree


def _spawn(command: list[str], log_file: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    out = log_file.open("ab")
    env = dict(os.environ, PYTHONPATH=str(TREE))
    # Own process group, so stopping a server stops its children (workers) too.
    return subprocess.Popen(
        command, cwd=cwd or TREE, stdout=out, stderr=out, env=env, start_new_session=True
    )


async def _request(endpoint: Endpoint, method: str, path: str, **kw: object) -> tuple[int, bytes]:
    connector = aiohttp.UnixConnector(path=str(endpoint.socket)) if endpoint.socket else None
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, endpoint.url + path, **kw) as resp,  # type: ignore[arg-type]
    ):
        return resp.status, await resp.read()


def request(endpoint: Endpoint, method: str, path: str, **kw: object) -> tuple[int, bytes]:
    return asyncio.run(_request(endpoint, method, path, **kw))


def wait_until(server: Server, check: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in server.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited {proc.returncode} while waiting for {what}"
                )
        try:
            if check():  # type: ignore[operator]
                return
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: timed out waiting for {what}")
        time.sleep(0.2)


def start_ours(
    home: Path, model_dir: Path, *, workers: int | None, tcp: bool, grpc: bool = False
) -> Server:
    name = f"ours --workers {workers}" if workers else "ours"
    home.mkdir(parents=True, exist_ok=True)
    declarations = home / "declarations"
    declarations.mkdir(exist_ok=True)
    declaration = {
        "apiVersion": "nodecache.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": MODEL},
        "spec": {
            "sourceModelUri": model_dir.as_uri() + "/",
            "modelSize": "1Mi",
            "nodeGroups": ["default"],
            "format": "onnx",
        },
    }
    (declarations / "mlp.yaml").write_text(json.dumps(declaration))
    socket_dir = home / "run"
    command = [
        str(PROJECT_PY), "-m", "nodecache.agent.cli", "agent",
        "--declarations", str(declarations),
        "--cache-dir", str(home / "cache"),
        "--socket-dir", str(socket_dir),
        "--metrics-port", "0",
        "--log-format", "json",
        "--log-level", "warning",
    ]  # fmt: skip
    port = free_port() if tcp else None
    if port is not None:
        command += ["--http-port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    grpc_port = free_port() if grpc else None
    if grpc_port is not None:
        command += ["--grpc-port", str(grpc_port)]
    server = Server(name, [_spawn(command, home / "agent.log")])
    if grpc_port is not None:
        server.grpc_url = f"127.0.0.1:{grpc_port}"
    uds = Endpoint(f"{name} UDS", "http://localhost", socket_dir / "nodecache.sock")
    server.endpoints.append(uds)
    if port is not None:
        server.endpoints.append(Endpoint(f"{name} TCP", f"http://127.0.0.1:{port}"))
    server.pid = server.procs[0].pid

    def state() -> str | None:
        code, data = request(uds, "GET", "/nodecache/v1/status")
        if code != 200:
            return None
        models = json.loads(data)["models"]
        return next((m["state"] for m in models if m["name"] == MODEL), None)

    wait_until(server, lambda: state() in ("Downloaded", "Loading", "Warm"), f"{name} model")
    wait_until(server, lambda: request(uds, "POST", f"/v2/repository/models/{MODEL}/load")[0]
               == 200, f"{name} load")  # fmt: skip
    wait_until(server, lambda: state() == "Warm", f"{name} warm")
    return server


def start_proxy(home: Path, ours: Server, socket_dir: Path) -> Server:
    """`nodecache proxy` on TCP in front of ours' node socket (the KServe runtime's hop),
    under another name, so the renaming is paid for too. Its CPU counts the agent's."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        str(PROJECT_PY), "-m", "nodecache.agent.cli", "proxy",
        "--model", MODEL, "--served-name", PROXY_NAME,
        "--listen", f"127.0.0.1:{port}", "--socket-dir", str(socket_dir),
        "--log-level", "warning",
    ]  # fmt: skip
    server = Server("proxy", [_spawn(command, home / "proxy.log")])
    assert ours.pid is not None
    tcp = Endpoint("proxy TCP", f"http://127.0.0.1:{port}", also_pids=[ours.pid],
                   path=f"/v2/models/{PROXY_NAME}/infer")  # fmt: skip
    server.endpoints = [tcp]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", "/v2/health/ready")[0] == 200, "proxy")
    return server


def start_bare(home: Path, model: Path) -> Server:
    port, sock = free_port(), home / "bare.sock"
    sock.unlink(missing_ok=True)
    command = [str(PROJECT_PY), str(HERE / "_serve_peers.py"), "bare", str(model), str(port),
               str(sock)]  # fmt: skip
    server = Server("bare aiohttp+ort", [_spawn(command, home / "bare.log")])
    tcp = Endpoint("bare aiohttp+ort TCP", f"http://127.0.0.1:{port}")
    server.endpoints = [tcp, Endpoint("bare aiohttp+ort UDS", "http://localhost", sock)]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", "/v2/health/live")[0] == 200, "bare server")
    return server


def start_kserve(home: Path, model: Path) -> Server:
    python = ensure_venv("kserve")
    port = free_port()
    command = [str(python), str(HERE / "_serve_peers.py"), "kserve", str(model), str(port)]
    server = Server("KServe", [_spawn(command, home / "kserve.log")])
    tcp = Endpoint("KServe 0.21 TCP", f"http://127.0.0.1:{port}")
    server.endpoints = [tcp]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", f"/v2/models/{MODEL}/ready")[0] == 200,
               "KServe model ready")  # fmt: skip
    return server


def start_mlserver(home: Path, model: Path) -> Server:
    python = ensure_venv("mlserver")
    sys.path.insert(0, str(HERE))
    from _serve_peers import write_mlserver_repo

    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    repo = write_mlserver_repo(home / "mlserver", model, ports)
    mlserver = python.parent / "mlserver"
    server = Server("MLServer", [_spawn([str(mlserver), "start", str(repo)],
                                        home / "mlserver.log", cwd=repo)])  # fmt: skip
    tcp = Endpoint("MLServer 1.7 TCP", f"http://127.0.0.1:{ports['http']}")
    server.endpoints = [tcp]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", f"/v2/models/{MODEL}/ready")[0] == 200,
               "MLServer model ready")  # fmt: skip
    return server


@contextlib.contextmanager
def servers_up(which: set[str], home: Path, model_dir: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        model = model_dir / "model.onnx"
        if "ours" in which or "proxy" in which:
            started.append(start_ours(home / "ours", model_dir, workers=None, tcp=True))
        if "proxy" in which:
            started.append(start_proxy(home / "proxy", started[-1], home / "ours" / "run"))
        if "workers" in which:
            started.append(start_ours(home / "ours-w1", model_dir, workers=1, tcp=False))
        if "workers2" in which:
            started.append(start_ours(home / "ours-w2", model_dir, workers=2, tcp=False))
        if "bare" in which:
            started.append(start_bare(home, model))
        if "mlserver" in which:
            started.append(start_mlserver(home, model))
        if "kserve" in which:
            started.append(start_kserve(home, model))
        yield started
    finally:
        for server in started:
            server.stop()
