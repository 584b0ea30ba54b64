"""``WorkerPool``: a ModelHost whose models live in supervised worker processes.

Each worker owns one device's slice of memory. A model is registered on one worker (its
home, the one with the most room for it); the node socket relays that model's requests to
the worker's data socket (``serve.relay``: only a checked target and an allow-list of
headers cross). The agent's own calls (register, load, status) go over a second,
token-guarded control socket that no caller's byte ever reaches. This class composes the
pieces: ``policy`` decides, ``supervisor`` keeps the processes, ``spreading`` makes copies
of hot models, ``client`` speaks the control protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from nodecache.serve.devices import Device
from nodecache.serve.errors import InvalidInput, ModelNotFound, ServeError, WorkerUnavailable
from nodecache.serve.metrics import forget_model
from nodecache.serve.pool import policy
from nodecache.serve.pool.client import WorkerClient
from nodecache.serve.pool.messages import Load
from nodecache.serve.pool.metrics import merge_metrics
from nodecache.serve.pool.policy import PoolTable, WorkerState
from nodecache.serve.pool.spreading import Spreader
from nodecache.serve.pool.supervisor import Supervisor, WorkerProcess
from nodecache.serve.relay import RelayBusy, UnsafeRequest
from nodecache.serve.runtimes.registry import device_kinds
from nodecache.serve.settings import ServeSettings
from nodecache.serve.spec import ModelPolicy, ModelSpec

__all__ = ["Answer", "WorkerPool"]

Answer = tuple[int, list[tuple[str, str]], bytes]
"""A worker's answer as relayed: status, headers, body."""


class WorkerPool:
    """A ModelHost whose models live in supervised worker processes."""

    def __init__(
        self, devices: list[Device], socket_dir: Path, settings: ServeSettings | None = None
    ) -> None:
        settings = settings or ServeSettings()
        workers = [WorkerState(i, d) for i, d in enumerate(devices)]
        self.table = PoolTable(workers, spread_at=settings.copies_at)
        self._supervisor = Supervisor(
            workers, socket_dir, settings, on_death=self._forget_copies_of
        )
        self._processes = {p.state.index: p for p in self._supervisor.processes}
        self._spreader = Spreader(self.table, self.client)

    # -- life of the workers -----------------------------------------------------------

    async def start(self) -> None:
        await self._supervisor.start()

    async def stop(self) -> None:
        self._spreader.stop()
        await self._supervisor.stop()

    def _process(self, worker: WorkerState) -> WorkerProcess:
        return self._processes[worker.index]

    def client(self, worker: WorkerState) -> WorkerClient:
        """The worker's control client (WorkerUnavailable before its first start)."""
        client = self._process(worker).client
        if client is None:
            raise WorkerUnavailable(f"worker {worker.index} is restarting")
        return client

    async def _forget_copies_of(self, dead: WorkerState) -> None:
        await self._spreader.forget_copies_of(dead)

    async def _refresh(self, worker: WorkerState) -> None:
        await self.client(worker).refresh()

    # -- ModelHost ---------------------------------------------------------------------

    def home(self, name: str) -> WorkerState:
        """The worker a model is registered on; ModelNotFound (404) if none."""
        worker = self.table.homes.get(name)
        if worker is None:
            raise ModelNotFound(name)
        return worker

    def has(self, name: str) -> bool:
        return name in self.table.homes

    async def register(self, spec: ModelSpec) -> None:
        table = self.table
        worker = table.homes.get(spec.name) or policy.choose_home(
            table, spec.name, device_kinds(spec.format)
        )
        # Reserve before the first await, so concurrent registrations spread out.
        worker.registrations[spec.name] = spec
        table.homes[spec.name] = worker
        try:
            await self.client(worker).register(spec)
        except ServeError:
            worker.registrations.pop(spec.name, None)
            table.homes.pop(spec.name, None)
            raise
        await self._refresh(worker)

    async def load(self, name: str, *, evict: bool) -> None:
        worker = self.home(name)
        await self.client(worker).load(name, Load(evict=evict))
        await self._refresh(worker)

    async def unregister(self, name: str) -> None:
        await self._drained(name)
        await self.drop_copies(name, "the model was removed")
        worker = self.table.homes.pop(name, None)
        if worker is None:
            return
        worker.registrations.pop(name, None)
        with contextlib.suppress(WorkerUnavailable, aiohttp.ClientError, OSError):
            await self.client(worker).unregister(name)
            await self._refresh(worker)
        worker.models.pop(name, None)
        forget_model(name)  # what this process counts of it (its mirror copies)

    async def _drained(self, name: str, timeout: float = 30.0) -> None:
        """Until no request for ``name`` is on its way from here to a worker: one relayed
        an instant before the model leaves its worker would find it gone (404). The agent
        stops routing to the model first, so this ends."""
        deadline = time.monotonic() + timeout
        while any(w.inflight.get(name) for w in self.table.workers):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.005)

    async def unload(self, name: str) -> None:
        worker = self.home(name)
        await self.drop_copies(name, "the model was unloaded")
        await self.client(worker).unload(name)
        await self._refresh(worker)

    async def set_policy(self, name: str, policy: ModelPolicy) -> None:
        worker = self.table.homes.get(name)
        if worker is None:
            return
        old = worker.registrations[name]
        worker.registrations[name] = old.with_policy(policy)
        await self.client(worker).set_policy(name, policy)
        if (old.served_name, old.version) != (policy.served_name, policy.version):
            # Copies answer with the name and version they were made with: made again.
            await self.drop_copies(name, "its served name or version changed")

    def describe(self, name: str) -> dict[str, Any] | None:
        return policy.describe(self.table, name)

    def names(self) -> list[str]:
        return list(self.table.homes)

    def devices(self) -> list[dict[str, Any]]:
        return [
            {**w.device.to_json(), "worker": w.index, "up": w.up, "pid": w.pid,
             "restarts": w.restarts}
            for w in self.table.workers
        ]  # fmt: skip

    async def refresh_all(self) -> None:
        """Pick up what workers changed on their own (idle unloads, LRU evictions)."""
        for worker in self.table.workers:
            if worker.up:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    await self._refresh(worker)
        await self._spreader.prune()

    def request_counts(self) -> dict[str, float]:
        """Requests answered per model by every worker, as of the last refresh (1 s)."""
        counts: dict[str, float] = {}
        for worker in self.table.workers:
            for seen in (worker.requests_before, worker.requests):
                for model, n in seen.items():
                    counts[model] = counts.get(model, 0.0) + n
        return counts

    async def metrics(self) -> CollectorRegistry:
        """The workers' serving metrics, scraped from each now and summed per series."""
        texts = await asyncio.gather(
            *(self.client(w).metrics() for w in self.table.workers if w.up),
            return_exceptions=True,
        )
        # A worker that died meanwhile: its series are gone with it.
        return merge_metrics(text for text in texts if isinstance(text, str))

    # -- requests ----------------------------------------------------------------------

    async def drop_copies(self, name: str, reason: str) -> None:
        """Stop routing to the model's extra copies and unload them."""
        await self._spreader.drop_copies(name, reason)

    async def make_copy(self, name: str, target: WorkerState) -> None:
        """An extra copy of the model on ``target`` now, whatever its load (benchmarks)."""
        await self._spreader.make_copy(name, self.home(name), target)

    async def infer(
        self, name: str, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> Answer:
        """An inference request to the model's least busy copy; if that copy turns out to
        be gone (404) or not warm (503), the model's home answers instead."""
        self.home(name)  # 404 for a model this pool does not hold
        worker, spread = policy.route(self.table, name, time.monotonic())
        if spread:
            self._spreader.start_copy(name)
        answer = await self.relay(worker, name, method, path, body, headers)
        if answer[0] in (404, 503) and (home := self.home(name)) is not worker:
            answer = await self.relay(home, name, method, path, body, headers)
        return answer

    async def ask_home(
        self, name: str, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> Answer:
        """Any other request about the model (metadata, repository load and unload), to
        its home."""
        return await self.relay(self.home(name), name, method, path, body, headers)

    async def relay(
        self,
        worker: WorkerState,
        name: str,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
    ) -> Answer:
        """One request to ``worker`` about model ``name``, counted while in flight."""
        link = self._process(worker).link
        if not worker.serving or link is None:
            raise WorkerUnavailable(
                f"model '{name}' is on worker {worker.index}, which is restarting"
            )
        inflight = worker.inflight
        inflight[name] = inflight.get(name, 0) + 1
        try:
            return await link.request(method, path, body, headers)
        except UnsafeRequest as exc:
            raise InvalidInput(str(exc)) from None
        except RelayBusy:
            raise WorkerUnavailable(
                f"worker {worker.index} is answering as many requests as it can; retry"
            ) from None
        except OSError:  # RelayError included
            raise WorkerUnavailable(
                f"worker {worker.index} stopped while answering for model '{name}'; retry"
            ) from None
        finally:
            inflight[name] -= 1
