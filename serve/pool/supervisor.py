"""Worker processes: started isolated, watched, restarted with backoff, given their models back.

Each worker is ``python -I -m nodecache.serve.worker`` (``-I``: neither the working
directory nor ``PYTHON*`` variables decide what runs), in its own session (a Ctrl-C meant
for the agent must not kill it mid-request), with the agent's folder of private sockets as
its working directory and the control token in its environment, never on its command line.
A worker that dies is started again after a backoff (0.5 s doubling to 30 s); its models
are registered again and those that were warm loaded again. Requests caught on the dead
worker get a clean 503 (``WorkerUnavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from nodecache.serve.errors import ServeError
from nodecache.serve.pool.client import WorkerClient
from nodecache.serve.pool.messages import TOKEN_ENV, Load
from nodecache.serve.pool.policy import WorkerState
from nodecache.serve.relay import WorkerLink
from nodecache.serve.settings import ServeSettings

__all__ = ["Supervisor", "WorkerProcess"]

log = logging.getLogger(__name__)

_START_SECONDS = 60.0
"""A worker whose control socket does not answer within this long failed to start."""


@dataclass
class WorkerProcess:
    """One worker's process and the agent's two ways to reach it."""

    state: WorkerState
    socket: Path  # the data socket: OIP requests relayed from the node socket
    control: Path  # the control socket: register, load, status (the agent's token only)
    proc: asyncio.subprocess.Process | None = None
    client: WorkerClient | None = None  # control calls
    link: WorkerLink | None = None  # requests relayed from the node socket


class Supervisor:
    """Starts, watches and restarts the pool's workers."""

    def __init__(
        self,
        workers: list[WorkerState],
        socket_dir: Path,
        settings: ServeSettings,
        *,
        on_death: Callable[[WorkerState], Awaitable[None]],
    ) -> None:
        sockets = socket_dir / "workers"
        self.processes = [
            WorkerProcess(w, sockets / f"worker-{w.index}.sock",
                          sockets / f"worker-{w.index}.control.sock")
            for w in workers
        ]  # fmt: skip
        self._settings = settings
        self._token = secrets.token_urlsafe(32)
        self._on_death = on_death
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    def command(self, process: WorkerProcess) -> list[str]:
        """The worker's command line: its sockets, its device, and the serving settings."""
        device = process.state.device
        return [
            sys.executable, "-I", "-m", "nodecache.serve.worker",
            "--socket", str(process.socket),
            "--control-socket", str(process.control),
            "--device", device.name,
            "--total", str(device.total),
            "--budget", str(device.budget),
            *self._settings.worker_args(),
        ]  # fmt: skip

    async def start(self) -> None:
        for process in self.processes:
            process.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            await self._spawn(process)
        self._watchers = [asyncio.create_task(self._supervise(p)) for p in self.processes]

    async def _spawn(self, process: WorkerProcess) -> None:
        state = process.state
        process.socket.unlink(missing_ok=True)
        process.control.unlink(missing_ok=True)
        # Metrics stay in the worker's memory (not prometheus_client's multiprocess files,
        # which cost a pid check and an mmap write per update): the agent pulls them.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env[TOKEN_ENV] = self._token
        process.proc = proc = await asyncio.create_subprocess_exec(
            *self.command(process), env=env, start_new_session=True, cwd=process.socket.parent
        )
        state.pid = proc.pid
        if process.client is None:
            process.client = WorkerClient(state, process.control, self._token)
        if process.link is not None:
            await process.link.close()  # connections to the dead process
        process.link = WorkerLink(str(process.socket))
        deadline = time.monotonic() + _START_SECONDS
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"worker {state.index} exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await process.client.refresh()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {state.index} did not start within 60 s")
            await asyncio.sleep(0.05)
        state.up = True
        log.info("worker up", extra={"worker": state.index, "pid": proc.pid,
                                     "device": state.device.name})  # fmt: skip

    async def _supervise(self, process: WorkerProcess) -> None:
        state = process.state
        while not self._stopping:
            assert process.proc is not None
            code = await process.proc.wait()
            if self._stopping:
                return
            state.up, state.restoring = False, True
            for model, n in state.requests.items():  # counts stay monotonic over restarts
                state.requests_before[model] = state.requests_before.get(model, 0.0) + n
            state.requests = {}
            try:
                await self._on_death(state)
            except Exception:  # never let bookkeeping stop the restart below
                log.exception("dropping copies failed", extra={"worker": state.index})
            warm = state.warm_homes()
            log.error("worker died", extra={"worker": state.index, "code": code, "warm": warm})
            delay = min(30.0, 0.5 * 2**state.restarts)
            state.restarts += 1
            await asyncio.sleep(delay)
            try:
                await self._spawn(process)
            except Exception as exc:
                log.error("worker restart failed", extra={"worker": state.index,
                                                          "error": str(exc)})  # fmt: skip
                continue
            await self._restore(process, warm)

    async def _restore(self, process: WorkerProcess, warm: list[str]) -> None:
        """Register a restarted worker's models again and reload the warm ones; a model
        that fails stays registered elsewhere in the agent's status, not the whole worker."""
        state, client = process.state, process.client
        assert client is not None
        for name, spec in list(state.registrations.items()):
            try:
                await client.register(spec)
                if name in warm:
                    await client.load(name, Load(evict=True))
            except ServeError as exc:
                log.error("model not restored", extra={"model": name, "error": str(exc)})
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await client.refresh()
        state.restoring, state.restarts = False, 0
        log.info("worker restored", extra={"worker": state.index, "reloaded": warm})

    async def stop(self) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        for process in self.processes:
            if process.proc is not None and process.proc.returncode is None:
                process.proc.terminate()
        for process in self.processes:
            if process.proc is not None:
                try:
                    await asyncio.wait_for(process.proc.wait(), 30)
                except TimeoutError:
                    process.proc.kill()
            if process.client is not None:
                await process.client.close()
            if process.link is not None:
                await process.link.close()
