"""Extra copies of hot models: made, tracked and dropped as ``policy`` decides.

A copy on the same GPU as the model's home attaches to the home's weights through CUDA
IPC instead of loading them again; on the CPU, copies share the weights' pages through the
page cache. Copies unload when idle and are never restored after a crash: they exist for
bursts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from nodecache.serve.errors import ServeError
from nodecache.serve.pool import policy
from nodecache.serve.pool.client import WorkerClient
from nodecache.serve.pool.messages import Load
from nodecache.serve.pool.policy import CopyState, PoolTable, WorkerState
from nodecache.serve.runtimes.registry import device_kinds

__all__ = ["Spreader"]

log = logging.getLogger(__name__)


class Spreader:
    """Makes and drops the extra copies of a pool's models."""

    def __init__(self, table: PoolTable, client: Callable[[WorkerState], WorkerClient]) -> None:
        self._table = table
        self._client = client
        self._tasks: set[asyncio.Task[None]] = set()

    def start_copy(self, name: str) -> None:
        """Make another copy of the model in the background, if a worker has room."""
        table = self._table
        home = table.homes[name]
        target = policy.copy_target(table, name, device_kinds(home.registrations[name].format))
        if target is None:
            table.spread_after[name] = time.monotonic() + policy.NO_ROOM_RETRY
            return
        table.spreading.add(name)
        task = asyncio.create_task(self.make_copy(name, home, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def make_copy(self, name: str, home: WorkerState, target: WorkerState) -> None:
        """A copy of the model on ``target``, routable once warm."""
        try:
            await self._copy_onto(name, home, target)
        finally:
            self._table.spreading.discard(name)

    async def _copy_onto(self, name: str, home: WorkerState, target: WorkerState) -> None:
        table = self._table
        spec = home.registrations.get(name)
        if spec is None or table.homes.get(name) is not home or home.pid is None:
            return  # removed or moved since the copy was decided
        attach = policy.attaches(spec, home, target)
        copy = CopyState(home.index, home.pid) if attach else CopyState()
        target.copies[name] = copy
        started = time.perf_counter()
        try:
            await self._client(target).register(policy.copy_spec(spec, attach))
            weights = None
            if attach:
                # Exported only now, right before the load that imports them: handles
                # nobody imports keep the home's memory reserved (see runtimes.ipc).
                exported = await self._client(home).weights(name)
                weights, copy.home_loads = exported.weights, exported.loads
            await self._client(target).load(name, Load(evict=False, weights=weights))
        except (ServeError, aiohttp.ClientError, OSError) as exc:
            log.info("no extra copy", extra={"model": name, "worker": target.index,
                                             "reason": str(exc)})  # fmt: skip
            table.spread_after[name] = time.monotonic() + policy.FAILED_RETRY
            await self.drop_copy(name, target, "it failed to load")
            return
        moved = table.homes.get(name) is not home or target.copies.get(name) is not copy
        if moved or (attach and home.pid != copy.home_pid):
            # Removed, or a worker restarted, while it loaded.
            await self.drop_copy(name, target, "the model moved while the copy loaded")
            return
        copy.since = time.monotonic()
        table.copies.setdefault(name, []).append(target)
        log.info("extra copy warm", extra={
            "model": name, "worker": target.index, "device": target.device.name,
            "attached": attach, "seconds": round(time.perf_counter() - started, 3),
        })  # fmt: skip

    async def drop_copy(self, name: str, worker: WorkerState, reason: str) -> None:
        """Stop routing to the copy, then unload it there (after its requests finish)."""
        table = self._table
        copies = table.copies.get(name, [])
        if worker in copies:
            copies.remove(worker)
            log.info("extra copy dropped", extra={"model": name, "worker": worker.index,
                                                  "reason": reason})  # fmt: skip
        if not copies:
            table.copies.pop(name, None)
        if worker.copies.pop(name, None) is not None and policy.may_delete_copy(
            table, name, worker
        ):
            with contextlib.suppress(ServeError, aiohttp.ClientError, OSError):
                await self._client(worker).unregister(name)

    async def drop_copies(self, name: str, reason: str) -> None:
        for worker in list(self._table.copies.get(name, ())):
            await self.drop_copy(name, worker, reason)

    async def prune(self) -> None:
        """Drop the copies ``policy.stale_copies`` names."""
        for name, worker, reason in policy.stale_copies(self._table):
            await self.drop_copy(name, worker, reason)

    async def forget_copies_of(self, dead: WorkerState) -> None:
        """A worker died: drop what went with it."""
        for name, worker, reason in policy.copies_lost_with(self._table, dead):
            await self.drop_copy(name, worker, reason)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
