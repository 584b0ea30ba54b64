"""Cluster-mode agents run in-process, each on its own thread, loop and temp folders."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp

from nodecache.agent.cluster import ClusterOptions, run_cluster
from nodecache.agent.services import NodeOptions

from .server import FakeApiServer

__all__ = ["ClusterAgent", "ClusterReconciler", "socket_request"]


def socket_request(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One HTTP request over a Unix socket (from a thread with no running loop)."""

    async def go() -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session,
            session.request(
                method, f"http://localhost{path}", data=None if body is None else json.dumps(body)
            ) as resp,
        ):
            data = await resp.read()
            return resp.status, json.loads(data) if data else None

    return asyncio.run(go())


class ClusterAgent:
    """``run_cluster`` for one node against the fake; ``stop()`` ends it cleanly."""

    def __init__(self, fake: FakeApiServer, home: Path, node_name: str, **overrides: Any) -> None:
        home.mkdir(parents=True, exist_ok=True)
        node = NodeOptions(
            cache_dir=home / "cache",
            socket_dir=home / "run",
            metrics_port=None,
        )
        self.options = ClusterOptions(
            node_name=node_name,
            node=node,
            kubeconfig=fake.write_kubeconfig(home / "kubeconfig", user="agent"),
            status_interval=0.2,
            heartbeat_interval=1.0,
            watch_timeout=5.0,
            **overrides,
        )
        self.socket = node.socket_dir / "nodecache.sock"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name=f"agent-{node_name}")
        self._started = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._started.set()
            await run_cluster(self.options, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
            self._started.set()

    def start(self) -> ClusterAgent:
        self._thread.start()
        self._started.wait(10)
        return self

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return socket_request(self.socket, method, path, body)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self.error is not None:
            raise self.error


class ClusterReconciler:
    """``run_reconciler`` against the fake on its own thread and loop."""

    def __init__(self, fake: FakeApiServer, home: Path, identity: str, **overrides: Any) -> None:
        from nodecache.agent.kube.reconciler import ReconcilerOptions

        home.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "kubeconfig": fake.write_kubeconfig(home / f"kubeconfig-{identity}", "reconciler"),
            "identity": identity,
            "metrics_port": None,
            "resync_interval": 1.0,
            "min_pass_interval": 0.1,
            "watch_timeout": 5.0,
            "lease_duration": 1.5,
            "renew_deadline": 1.0,
            "retry_period": 0.2,
            **overrides,
        }
        self.options = ReconcilerOptions(**settings)
        self.reconciler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name=identity)
        self._started = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        from nodecache.agent.kube.api import Kube, connect
        from nodecache.agent.kube.reconciler import Reconciler

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            kube = Kube(connect(self.options.kubeconfig))
            self.reconciler = Reconciler(kube, self.options)
            self._started.set()
            task = asyncio.create_task(self.reconciler.run())
            await self._stop.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            kube.api.close()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
            self._started.set()

    @property
    def leading(self) -> bool:
        return bool(self.reconciler and self.reconciler.elector.leading)

    def start(self) -> ClusterReconciler:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self.error is not None:
            raise self.error
