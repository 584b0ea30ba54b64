"""Real parts the tests start: the agent as a child process, a slow HTTP source, and the
SeaweedFS S3 server (which ``scripts/bench/fetch.py`` starts the same way)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from nodecache.cache import FetchOptions

ROOT = Path(__file__).resolve().parent.parent

SMALL = FetchOptions(
    chunk_size=64 * 1024,
    part_size=256 * 1024,
    fsync=False,
    retries=2,
    backoff_base=0.01,
    backoff_max=0.05,
)
"""Fetch options for tests: small parts (many ranges from small files), no fsync, fast retries."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def uds_request(
    socket_path: Path,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request over a Unix socket; returns (status, headers, body)."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with aiohttp.ClientSession(connector=connector) as session:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            async with session.request(
                method, f"http://localhost{path}", data=data, headers=headers
            ) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(go())


class Agent:
    """``nodecache agent`` in a child process, on its own temp folders."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.declarations = home / "declarations"
        self.cache_dir = home / "cache"
        self.socket_dir = home / "run"
        self.socket = self.socket_dir / "nodecache.sock"
        self.log = home / "agent.log"
        self.declarations.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Agent:
        command = [
            sys.executable, "-m", "nodecache.agent.cli", "agent",
            "--declarations", str(self.declarations),
            "--cache-dir", str(self.cache_dir),
            "--socket-dir", str(self.socket_dir),
            "--metrics-port", "0",
            "--log-format", "json",
            *extra,
        ]  # fmt: skip
        log = self.log.open("ab")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        wait_for(self._answers, timeout=60, what="the agent socket")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            return self.request("GET", "/v2/health/live")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = uds_request(self.socket, method, path, body, **kw)
        return status, json.loads(data) if data else None

    def status(self) -> dict[str, Any]:
        code, doc = self.request("GET", "/nodecache/v1/status")
        assert code == 200, doc
        return doc

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["models"] if m["name"] == name), None)

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            model = self.model(name)
            return model if model and model["state"] == state else None

        return wait_for(check, timeout, f"model {name} to be {state}")

    def declare(self, filename: str, text: str) -> None:
        # Write then rename, as editors and kubectl-like tools do: never a half file.
        tmp = self.declarations / f".{filename}.tmp"
        tmp.write_text(text)
        tmp.rename(self.declarations / filename)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def declaration(name: str, uri: str, size: str = "10Mi", **spec: Any) -> str:
    doc = {
        "apiVersion": "nodecache.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": name},
        "spec": {"sourceModelUri": uri, "modelSize": size, "nodeGroups": ["default"], **spec},
    }
    return json.dumps(doc)  # JSON is YAML


class SlowHttpSource:
    """Serves files from a folder at a limited rate (GET streams, HEAD gives the length)."""

    def __init__(self, root: Path, bytes_per_second: int) -> None:
        self.root = root
        self.rate = bytes_per_second
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = self.root / request.match_info["path"]
        if not path.is_file():
            raise web.HTTPNotFound()
        data = path.read_bytes()
        headers = {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        step = max(1, self.rate // 20)
        for i in range(0, len(data), step):
            await resp.write(data[i : i + step])
            await asyncio.sleep(0.05)
        return resp

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{path:.+}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> SlowHttpSource:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def seaweed_ports(n: int) -> list[int]:
    """n free ports p such that p + 10000 is free too (weed derives gRPC ports that way)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


def launch_seaweedfs(
    weed: str | Path, root: Path, *, bucket: str, access_key: str, secret_key: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``weed mini`` on loopback, its data under ``root`` (log: ``root/weed.log``),
    with one bucket and one identity; returns the process and the S3 endpoint. The caller
    waits for the bucket to appear (~1.5 s after the port) and stops the process."""
    config = root / "s3.json"
    identity = {
        "name": "nodecache",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    (root / "data").mkdir(parents=True, exist_ok=True)
    s3, master, volume, filer, admin = seaweed_ports(5)
    cmd = [
        str(weed), "mini", f"-dir={root / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
        f"-filer.port={filer}", f"-admin.port={admin}", f"-s3.config={config}",
        f"-bucket={bucket}", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    with (root / "weed.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{s3}"


# A child connects to the node socket, passes the connection to us (SCM_RIGHTS) and exits:
# whatever we send on it is no longer the connector's.
_HAND_OVER = textwrap.dedent(
    """
    import socket, sys
    back = socket.socket(fileno=int(sys.argv[2]))
    client = socket.socket(socket.AF_UNIX)
    client.connect(sys.argv[1])
    socket.send_fds(back, [b"x"], [client.fileno()])
    """
)


def orphaned_connection(node_socket: Path) -> socket.socket:
    """A connection to ``node_socket`` whose connecting process has exited."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        child = subprocess.run(
            [sys.executable, "-c", _HAND_OVER, str(node_socket), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            timeout=30,
        )
        assert child.returncode == 0
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    return socket.socket(fileno=fds[0])
