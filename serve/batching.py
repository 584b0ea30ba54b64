"""Dynamic batching: concurrent requests for one model run as one call, like Triton's.

Requests whose inputs agree on names, datatypes and all but the first dimension
are stacked along that first (batch) dimension, run once, and split back. A batch
runs when it reaches ``max_batch_size`` rows or ``max_queue_delay`` after its first
request arrived, whichever is first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Protocol

import numpy as np

__all__ = ["Batcher", "Span"]

Inputs = dict[str, np.ndarray]
Run = Callable[[Inputs], Awaitable[dict[str, np.ndarray]]]


class Span(Protocol):
    """Where a request's batch ran, ``perf_counter_ns`` (for its statistics)."""

    began: int
    ended: int


@dataclass
class _Pending:
    items: list[tuple[Inputs, asyncio.Future[dict[str, np.ndarray]], Span | None]] = field(
        default_factory=list
    )
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


def _key(inputs: Inputs) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


class Batcher:
    def __init__(self, run: Run, max_batch_size: int, max_queue_delay: float) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self._pending: dict[tuple, _Pending] = {}

    async def submit(self, inputs: Inputs, span: Span | None = None) -> dict[str, np.ndarray]:
        """The outputs for ``inputs``, run in a batch; ``span`` learns when it ran."""
        rows = {a.shape[0] if a.ndim else 0 for a in inputs.values()}
        if len(rows) != 1 or 0 in rows:  # not batchable: run alone
            return await self._timed(inputs, [span])
        key = _key(inputs)
        pending = self._pending.setdefault(key, _Pending())
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        pending.items.append((inputs, future, span))
        pending.rows += rows.pop()
        if pending.rows >= self.max_batch_size:
            self._flush(key)
        elif pending.timer is None:
            loop = asyncio.get_running_loop()
            pending.timer = loop.call_later(self.max_queue_delay, self._flush, key)
        return await future

    def _flush(self, key: tuple) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        asyncio.get_running_loop().create_task(self._execute(pending.items))

    async def _timed(self, inputs: Inputs, spans: list[Span | None]) -> dict[str, np.ndarray]:
        began = perf_counter_ns()
        outputs = await self._run(inputs)
        ended = perf_counter_ns()
        for span in spans:
            if span is not None:
                span.began, span.ended = began, ended
        return outputs

    async def _execute(
        self, items: list[tuple[Inputs, asyncio.Future[dict[str, np.ndarray]], Span | None]]
    ) -> None:
        names = list(items[0][0])
        sizes = [next(iter(inputs.values())).shape[0] for inputs, _, _ in items]
        try:
            stacked = {n: np.concatenate([inputs[n] for inputs, _, _ in items]) for n in names}
            outputs = await self._timed(stacked, [span for _, _, span in items])
            total = sum(sizes)
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    raise ValueError(
                        f"output '{name}' has {array.shape[:1]} rows for a batch of {total}; "
                        "turn dynamic batching off for this model"
                    )
            bounds = np.cumsum(sizes)[:-1]
            parts = {name: np.split(array, bounds) for name, array in outputs.items()}
            for i, (_, future, _) in enumerate(items):
                if not future.done():
                    future.set_result({name: chunks[i] for name, chunks in parts.items()})
        except Exception as exc:
            for _, future, _ in items:
                if not future.done():
                    future.set_exception(exc)
