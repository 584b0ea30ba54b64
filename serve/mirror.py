"""Shadow traffic: copies of requests to mirror versions, compared, then thrown away.

The caller never waits for a mirror: ``offer`` only puts a copy in a bounded queue (or
counts it dropped when the queue is full), and a few tasks send the copies and compare
each answer with the primary's. Comparing large tensors runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from nodecache.serve.metrics import MIRROR_DIVERGENT, MIRROR_DROPPED, MIRROR_REQUESTS, child
from nodecache.serve.protocol import sized_work, tensor_bytes
from nodecache.serve.routing import Route

__all__ = ["Mirror", "Outputs", "differ"]

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Copy:
    route: Route
    send: Callable[[], Awaitable[Outputs]]
    primary: Callable[[], Awaitable[Outputs]]


class Mirror:
    """A bounded queue of request copies and the tasks that send them."""

    def __init__(
        self, *, queue: int = 64, tasks: int = 2, rtol: float = 1e-3, atol: float = 1e-5
    ) -> None:
        self._size, self._tasks_wanted = queue, tasks
        self.rtol, self.atol = rtol, atol
        self._queue: asyncio.Queue[_Copy] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def offer(
        self,
        route: Route,
        send: Callable[[], Awaitable[Outputs]],
        primary: Callable[[], Awaitable[Outputs]],
    ) -> None:
        """Queue a copy for ``route`` (``send`` runs it, ``primary`` gives the outputs to
        compare with); never blocks: a full queue drops the copy and counts it."""
        if self._queue is None:  # started on first use, on the serving loop
            self._queue = asyncio.Queue(self._size)
            self._tasks = [asyncio.create_task(self._run()) for _ in range(self._tasks_wanted)]
        try:
            self._queue.put_nowait(_Copy(route, send, primary))
        except asyncio.QueueFull:
            child(MIRROR_DROPPED, route.key, route.version).inc()

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            copy = await self._queue.get()
            route = copy.route
            try:
                mine = await copy.send()
                theirs = await copy.primary()
            except Exception as exc:  # a mirror's failure is its own, never the caller's
                child(MIRROR_DROPPED, route.key, route.version).inc()
                log.info("mirror request failed", extra={"model": route.key, "error": str(exc)})
                continue
            child(MIRROR_REQUESTS, route.key, route.version).inc()
            size = tensor_bytes(mine) + tensor_bytes(theirs)
            if await sized_work(size, differ, theirs, mine, self.rtol, self.atol):
                child(MIRROR_DIVERGENT, route.key, route.version).inc()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks, self._queue = [], None


def differ(primary: Outputs, mirror: Outputs, rtol: float, atol: float) -> bool:
    """Whether two answers differ: other output names or shapes, numbers beyond the
    tolerance (NaN equal to NaN), or any other value not equal."""
    if primary.keys() != mirror.keys():
        return True
    for name, expected in primary.items():
        got = mirror[name]
        if expected.shape != got.shape:
            return True
        if expected.dtype.kind in "fciub" and got.dtype.kind in "fciub":
            if not np.allclose(
                got, expected, rtol=rtol, atol=atol, equal_nan=expected.dtype.kind in "fc"
            ):
                return True
        elif not np.array_equal(got, expected):
            return True
    return False
