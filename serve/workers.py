"""Co-located model servers: worker processes the agent supervises and routes to.

Each worker owns one device's slice of memory. A model is registered on one
worker (its home, the one with the most room for it); the node socket relays that
model's requests to the worker's data socket (``nodecache.serve.relay``: only a checked target
and an allow-list of headers cross). The agent's own calls (register, load, status)
go over a second, token-guarded control socket that no caller's byte ever reaches.
A worker that dies is restarted and its
models are registered again, and those that were warm are loaded again; requests
caught on the dead worker get a clean 503.

A hot model spreads: when every worker holding it already has ``spread_at`` of its
requests in flight, another worker with room gets an extra copy (never by evicting)
and inference requests go to the least busy one. A copy on the same GPU as the home
attaches to the home's weights through CUDA IPC instead of loading them again; on the
CPU, copies share the weights' pages through the page cache. Copies unload when idle
and are never restored after a crash: they exist for bursts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from nodecache.serve.dataplane import (
    DEFAULT_MAX_OUTPUT_BYTES,
    MODEL_VERSION,
    SERVER_NAME,
    SERVER_VERSION,
    VERSION_PATTERN,
    Catalog,
)
from nodecache.serve.devices import Device
from nodecache.serve.errors import (
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    NoRoom,
    ServeError,
)
from nodecache.serve.http import PROTOCOL_HEADER, error_middleware
from nodecache.serve.protocol import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    decode_response,
    encode_request,
    sized_work,
    tensor_bytes,
)
from nodecache.serve.relay import RelayBusy, UnsafeRequest, WorkerLink
from nodecache.serve.runtimes import device_kinds
from nodecache.serve.worker import CONTROL, TOKEN_ENV

__all__ = ["PoolDataPlane", "WorkerPool", "build_router_app", "worker_devices"]

log = logging.getLogger(__name__)

# What crosses the relay: only the headers the worker's OIP routes read, never hop-by-hop
# ones (Expect, Connection, Transfer-Encoding, ...) nor our own X-Nodecache-* from a caller.
_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", HEADER_LENGTH.lower(), "traceparent", "tracestate", "x-request-id"}
)
_ANSWER_HEADERS = frozenset({"content-type", HEADER_LENGTH.lower(), "retry-after", "x-request-id"})


_COPY_IDLE = 60.0
"""An extra copy unloads after this long without requests (sooner if the model's own
idle timeout is shorter)."""
_NO_ROOM_RETRY = 5.0
"""After finding no worker with room for a copy, the next look for that model."""
_FAILED_RETRY = 30.0
"""After a copy failed to load, the next try for that model."""


class WorkerUnavailable(ServeError):
    status = 503
    retry_after = 1.0


class MethodNotAllowed(ServeError):
    status = 405


@dataclass
class _Copy:
    """A model warm (or loading) on a worker besides its home."""

    attached_to: int | None = None  # the worker whose GPU weights it uses (CUDA IPC)
    home_pid: int | None = None  # that worker's process when it exported them
    home_loads: int | None = None  # and how many times it had loaded the model by then
    since: float = 0.0  # when it became routable (monotonic); 0 while it loads


@dataclass
class _Registration:
    path: Path
    fmt: str
    entrypoint: str | None
    pinned: bool
    idle_timeout: float | None
    size_hint: int | None
    batching: tuple[int, float] | None = None
    on_demand: bool = True  # False for copies: unloaded, they answer 503, never reload

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.fmt,
            "entrypoint": self.entrypoint,
            "pinned": self.pinned,
            "idleTimeout": self.idle_timeout,
            "sizeHint": self.size_hint,
            "batching": list(self.batching) if self.batching else None,
            "onDemand": self.on_demand,
        }


@dataclass
class _Worker:
    index: int
    device: Device
    socket: Path  # the data socket: OIP requests relayed from the node socket
    control: Path  # the control socket: register, load, status (the agent's token only)
    proc: asyncio.subprocess.Process | None = None
    session: aiohttp.ClientSession | None = None  # control calls (register, load, status)
    link: WorkerLink | None = None  # requests relayed from the node socket
    up: bool = False
    # Between a restart and its models being registered again: routed requests get 503,
    # not the new worker's 404 for a model it does not know yet.
    restoring: bool = False
    restarts: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # last status seen
    requests: dict[str, float] = field(default_factory=dict)  # answered, as last seen
    requests_before: dict[str, float] = field(default_factory=dict)  # by earlier processes
    registrations: dict[str, _Registration] = field(default_factory=dict)
    copies: dict[str, _Copy] = field(default_factory=dict)  # loading or warm here
    inflight: dict[str, int] = field(default_factory=dict)  # relayed requests, per model
    refreshed_at: float = 0.0  # when the status in ``models`` was asked for (monotonic)

    @property
    def serving(self) -> bool:
        return self.up and not self.restoring and self.session is not None

    @property
    def reserved(self) -> int:
        return sum(r.size_hint or 0 for r in self.registrations.values())


class _Snapshot(Collector):
    """Metric families already collected (from the workers), for one exposition."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class WorkerPool:
    """A ModelHost whose models live in supervised worker processes."""

    def __init__(
        self,
        devices: list[Device],
        socket_dir: Path,
        *,
        log_format: str = "text",
        model_concurrency: int = 4,
        model_queue: int = 256,
        spread_at: int | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        sockets = socket_dir / "workers"
        self._workers = [
            _Worker(i, d, sockets / f"worker-{i}.sock", sockets / f"worker-{i}.control.sock")
            for i, d in enumerate(devices)
        ]
        self._token = secrets.token_urlsafe(32)
        self._log_format = log_format
        self._limits = (model_concurrency, model_queue, max_output_bytes)
        self._homes: dict[str, _Worker] = {}
        # Extra warm copies of hot models, in the order they were made (see module doc).
        self._copies: dict[str, list[_Worker]] = {}
        self._spread_at = model_concurrency if spread_at is None else spread_at
        self._spreading: set[str] = set()
        self._spread_after: dict[str, float] = {}  # model -> no new copy before (monotonic)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._supervisors: list[asyncio.Task[None]] = []

    # -- life of the workers -----------------------------------------------------------

    async def start(self) -> None:
        for worker in self._workers:
            worker.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            await self._spawn(worker)
        self._supervisors = [asyncio.create_task(self._supervise(w)) for w in self._workers]

    async def _spawn(self, worker: _Worker) -> None:
        # -I: neither the working directory nor PYTHON* variables decide what runs as the
        # worker (a folder named like one of our packages, or a planted file, would).
        command = [
            sys.executable, "-I", "-m", "nodecache.serve.worker",
            "--socket", str(worker.socket),
            "--control-socket", str(worker.control),
            "--device", worker.device.name,
            "--total", str(worker.device.total),
            "--budget", str(worker.device.budget),
            "--log-format", self._log_format,
            "--model-concurrency", str(self._limits[0]),
            "--model-queue", str(self._limits[1]),
            "--max-output-bytes", str(self._limits[2]),
        ]  # fmt: skip
        worker.socket.unlink(missing_ok=True)
        worker.control.unlink(missing_ok=True)
        # Metrics stay in the worker's memory (not prometheus_client's multiprocess files,
        # which cost a pid check and an mmap write per update): the agent pulls them.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env[TOKEN_ENV] = self._token
        # Its own session: a Ctrl-C meant for the agent must not kill workers mid-request;
        # the agent stops them in order.
        worker.proc = await asyncio.create_subprocess_exec(
            *command, env=env, start_new_session=True, cwd=worker.socket.parent
        )
        if worker.session is None:
            connector = aiohttp.UnixConnector(path=str(worker.control), limit=16)
            worker.session = aiohttp.ClientSession(
                "http://worker",
                connector=connector,
                headers={"Authorization": f"Bearer {self._token}"},
            )
        if worker.link is not None:
            await worker.link.close()  # connections to the dead process
        worker.link = WorkerLink(str(worker.socket))
        deadline = time.monotonic() + 60
        while True:
            if worker.proc.returncode is not None:
                raise RuntimeError(f"worker {worker.index} exited with {worker.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self._refresh(worker)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.index} did not start within 60 s")
            await asyncio.sleep(0.05)
        worker.up = True
        log.info("worker up", extra={"worker": worker.index, "pid": worker.proc.pid,
                                     "device": worker.device.name})  # fmt: skip

    async def _supervise(self, worker: _Worker) -> None:
        while not self._stopping:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._stopping:
                return
            worker.up, worker.restoring = False, True
            for model, n in worker.requests.items():  # counts stay monotonic over restarts
                worker.requests_before[model] = worker.requests_before.get(model, 0.0) + n
            worker.requests = {}
            try:
                await self._forget_copies_of(worker)
            except Exception:  # never let bookkeeping stop the restart below
                log.exception("dropping copies failed", extra={"worker": worker.index})
            warm = [n for n, m in worker.models.items()
                    if m.get("state") == "Warm" and n in worker.registrations]  # fmt: skip
            log.error("worker died", extra={"worker": worker.index, "code": code, "warm": warm})
            delay = min(30.0, 0.5 * 2**worker.restarts)
            worker.restarts += 1
            await asyncio.sleep(delay)
            try:
                await self._spawn(worker)
            except Exception as exc:
                log.error("worker restart failed", extra={"worker": worker.index,
                                                          "error": str(exc)})  # fmt: skip
                continue
            await self._restore(worker, warm)

    async def _restore(self, worker: _Worker, warm: list[str]) -> None:
        """Register a restarted worker's models again and reload the warm ones; a model
        that fails stays registered elsewhere in the agent's status, not the whole worker."""
        for name, registration in list(worker.registrations.items()):
            try:
                await self._call(worker, "PUT", f"{CONTROL}/models/{name}",
                                 registration.to_json())  # fmt: skip
                if name in warm:
                    await self._call(worker, "POST", f"{CONTROL}/models/{name}/load")
            except ServeError as exc:
                log.error("model not restored", extra={"model": name, "error": str(exc)})
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await self._refresh(worker)
        worker.restoring, worker.restarts = False, 0
        log.info("worker restored", extra={"worker": worker.index, "reloaded": warm})

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._supervisors, *self._tasks]:
            task.cancel()
        for worker in self._workers:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.terminate()
        for worker in self._workers:
            if worker.proc is not None:
                try:
                    await asyncio.wait_for(worker.proc.wait(), 30)
                except TimeoutError:
                    worker.proc.kill()
            if worker.session is not None:
                await worker.session.close()
            if worker.link is not None:
                await worker.link.close()

    # -- talking to a worker -----------------------------------------------------------

    async def _call(self, worker: _Worker, method: str, path: str, body: Any = None) -> Any:
        if not worker.up or worker.session is None:
            raise WorkerUnavailable(f"worker {worker.index} is restarting")
        try:
            async with worker.session.request(method, path, json=body) as resp:
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkerUnavailable(f"worker {worker.index} is not answering: {exc}") from None
        if resp.status >= 400:
            message = doc.get("error", "") if isinstance(doc, dict) else str(doc)
            raise {503: NoRoom, 404: ModelNotFound}.get(resp.status, ModelLoadError)(message)
        return doc

    async def _refresh(self, worker: _Worker) -> None:
        assert worker.session is not None
        asked = time.monotonic()
        async with worker.session.get(f"{CONTROL}/status") as resp:
            doc = await resp.json()
        worker.models, worker.refreshed_at = doc["models"], asked
        worker.device.used = doc["devices"][0]["used"]
        worker.requests = doc.get("requests", {})

    # -- ModelHost ---------------------------------------------------------------------

    async def register(
        self,
        name: str,
        path: Path,
        fmt: str,
        *,
        entrypoint: str | None,
        pinned: bool,
        idle_timeout: float | None,
        size_hint: int | None,
        batching: tuple[int, float] | None = None,
    ) -> None:
        registration = _Registration(
            path, fmt, entrypoint, pinned, idle_timeout, size_hint, batching
        )
        worker = self._homes.get(name) or self._choose(fmt, name)
        # Reserve before the first await, so concurrent registrations spread out.
        worker.registrations[name] = registration
        self._homes[name] = worker
        try:
            await self._call(worker, "PUT", f"{CONTROL}/models/{name}", registration.to_json())
        except ServeError:
            worker.registrations.pop(name, None)
            self._homes.pop(name, None)
            raise
        await self._refresh(worker)

    def _choose(self, fmt: str, name: str) -> _Worker:
        kinds = device_kinds(fmt)
        # Not where a copy of the same name may still be going away.
        usable = [w for w in self._workers if w.device.kind in kinds and name not in w.copies]
        usable = usable or self._workers
        return max(usable, key=lambda w: w.device.budget - w.reserved)

    async def load(self, name: str, *, evict: bool) -> None:
        worker = self._home(name)
        await self._call(worker, "POST", f"{CONTROL}/models/{name}/load?evict={int(evict)}")
        await self._refresh(worker)

    async def unregister(self, name: str) -> None:
        await self._drop_copies(name, "the model was removed")
        worker = self._homes.pop(name, None)
        if worker is None:
            return
        worker.registrations.pop(name, None)
        with contextlib.suppress(WorkerUnavailable, aiohttp.ClientError, OSError):
            await self._call(worker, "DELETE", f"{CONTROL}/models/{name}")
            await self._refresh(worker)
        worker.models.pop(name, None)

    async def unload(self, name: str) -> None:
        worker = self._home(name)
        await self._drop_copies(name, "the model was unloaded")
        await self._call(worker, "POST", f"{CONTROL}/models/{name}/unload")
        await self._refresh(worker)

    async def set_policy(
        self,
        name: str,
        *,
        pinned: bool,
        idle_timeout: float | None,
        batching: tuple[int, float] | None = None,
    ) -> None:
        worker = self._homes.get(name)
        if worker is None:
            return
        registration = worker.registrations[name]
        registration.pinned, registration.idle_timeout = pinned, idle_timeout
        registration.batching = batching
        body = registration.to_json()
        await self._call(worker, "PUT", f"{CONTROL}/models/{name}/policy", body)

    def describe(self, name: str) -> dict[str, Any] | None:
        worker = self._homes.get(name)
        if worker is None:
            return None
        seen = dict(worker.models.get(name) or {"state": "Downloaded"})
        if not worker.serving:
            seen.update(state="Downloaded", error=f"worker {worker.index} is restarting")
        seen["worker"] = worker.index
        copies = [
            {"worker": w.index, "device": w.device.name,
             "attached": w.copies[name].attached_to is not None,
             "requests": w.requests.get(name, 0.0)}
            for w in self._copies.get(name, ())
        ]  # fmt: skip
        if copies:
            seen["copies"] = copies
        return seen

    def names(self) -> list[str]:
        return list(self._homes)

    def devices(self) -> list[dict[str, Any]]:
        return [
            {**w.device.to_json(), "worker": w.index, "up": w.up,
             "pid": w.proc.pid if w.proc else None, "restarts": w.restarts}
            for w in self._workers
        ]  # fmt: skip

    async def refresh_all(self) -> None:
        """Pick up what workers changed on their own (idle unloads, LRU evictions)."""
        for worker in self._workers:
            if worker.up:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    await self._refresh(worker)
        await self._prune_copies()

    # -- extra copies of hot models ----------------------------------------------------

    @staticmethod
    def _warm(worker: _Worker, name: str) -> bool:
        return worker.serving and worker.models.get(name, {}).get("state") == "Warm"

    def _routable(self, worker: _Worker, name: str) -> bool:
        """A copy takes requests until a status asked for after it loaded says it is gone."""
        copy = worker.copies.get(name)
        if copy is None or not copy.since or not worker.serving:
            return False
        return worker.refreshed_at < copy.since or self._warm(worker, name)

    def _route(self, name: str) -> _Worker:
        """The model's least busy warm worker (its home on ties); may start a new copy."""
        worker = self._home(name)
        copies = self._copies.get(name)
        if copies:
            best, key = worker, (not self._warm(worker, name), worker.inflight.get(name, 0))
            for copy in copies:
                if (k := (False, copy.inflight.get(name, 0))) < key and self._routable(copy, name):
                    best, key = copy, k
            worker = best
        if (
            self._spread_at
            and worker.inflight.get(name, 0) >= self._spread_at
            and name not in self._spreading
            and time.monotonic() >= self._spread_after.get(name, 0.0)
        ):
            self._start_copy(name)
        return worker

    def _start_copy(self, name: str) -> None:
        home = self._homes[name]
        target = self._copy_target(name, home)
        if target is None:
            self._spread_after[name] = time.monotonic() + _NO_ROOM_RETRY
            return
        self._spreading.add(name)
        task = asyncio.create_task(self._make_copy(name, home, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _copy_target(self, name: str, home: _Worker) -> _Worker | None:
        """A serving worker that does not hold the model and has room for it: on the
        home's GPU first (it can attach to the weights there), then the most free."""
        if not self._warm(home, name):
            return None
        registration = home.registrations[name]
        needed = home.models[name].get("residentBytes") or registration.size_hint or 0
        kinds = device_kinds(registration.fmt)
        attachable = _attachable(registration)

        def same_gpu(w: _Worker) -> bool:
            return attachable and w.device.kind == "cuda" and w.device.name == home.device.name

        usable = [
            w for w in self._workers
            if w is not home and w.serving and name not in w.copies and w.device.kind in kinds
            and (same_gpu(w) or needed <= w.device.free)
        ]  # fmt: skip
        return max(usable, key=lambda w: (same_gpu(w), w.device.free), default=None)

    async def _make_copy(self, name: str, home: _Worker, target: _Worker) -> None:
        try:
            await self._copy_onto(name, home, target)
        finally:
            self._spreading.discard(name)

    async def _copy_onto(self, name: str, home: _Worker, target: _Worker) -> None:
        registration = home.registrations.get(name)
        if registration is None or self._homes.get(name) is not home or home.proc is None:
            return  # removed or moved since the copy was decided
        attach = (
            _attachable(registration)
            and target.device.kind == "cuda"
            and target.device.name == home.device.name
        )
        copy = _Copy(home.index, home.proc.pid) if attach else _Copy()
        target.copies[name] = copy
        started = time.perf_counter()
        try:
            await self._call(target, "PUT", f"{CONTROL}/models/{name}", _Registration(
                registration.path, registration.fmt, registration.entrypoint,
                pinned=False,
                idle_timeout=min(registration.idle_timeout or _COPY_IDLE, _COPY_IDLE),
                size_hint=0 if attach else registration.size_hint,
                batching=registration.batching,
                on_demand=False,
            ).to_json())  # fmt: skip
            body = None
            if attach:
                # Exported only now, right before the load that imports them: handles
                # nobody imports keep the home's memory reserved (see runtimes.ipc).
                answer = await self._call(home, "GET", f"{CONTROL}/models/{name}/weights")
                body, copy.home_loads = {"weights": answer["weights"]}, answer["loads"]
            await self._call(target, "POST", f"{CONTROL}/models/{name}/load?evict=0", body)
        except (ServeError, aiohttp.ClientError, OSError) as exc:
            log.info("no extra copy", extra={"model": name, "worker": target.index,
                                             "reason": str(exc)})  # fmt: skip
            self._spread_after[name] = time.monotonic() + _FAILED_RETRY
            await self._drop_copy(name, target, "it failed to load")
            return
        moved = self._homes.get(name) is not home or target.copies.get(name) is not copy
        if moved or (attach and home.proc.pid != copy.home_pid):
            # Removed, or a worker restarted, while it loaded.
            await self._drop_copy(name, target, "the model moved while the copy loaded")
            return
        copy.since = time.monotonic()
        self._copies.setdefault(name, []).append(target)
        log.info("extra copy warm", extra={
            "model": name, "worker": target.index, "device": target.device.name,
            "attached": attach, "seconds": round(time.perf_counter() - started, 3),
        })  # fmt: skip

    async def _drop_copy(self, name: str, worker: _Worker, reason: str) -> None:
        """Stop routing to the copy, then unload it there (after its requests finish)."""
        copies = self._copies.get(name, [])
        if worker in copies:
            copies.remove(worker)
            log.info("extra copy dropped", extra={"model": name, "worker": worker.index,
                                                  "reason": reason})  # fmt: skip
        if not copies:
            self._copies.pop(name, None)
        # Never on the model's home: a re-declared model may have landed there meanwhile.
        if worker.copies.pop(name, None) is not None and self._homes.get(name) is not worker:
            with contextlib.suppress(ServeError, aiohttp.ClientError, OSError):
                await self._call(worker, "DELETE", f"{CONTROL}/models/{name}")

    async def _drop_copies(self, name: str, reason: str) -> None:
        for worker in list(self._copies.get(name, ())):
            await self._drop_copy(name, worker, reason)

    async def _prune_copies(self) -> None:
        """Drop copies their worker unloaded (idle, evicted), and those attached to a
        home's GPU memory once the home no longer holds those very weights."""
        for name, copies in list(self._copies.items()):
            for worker in list(copies):
                copy = worker.copies.get(name)
                if copy is None:
                    await self._drop_copy(name, worker, "it is no longer tracked")
                elif worker.refreshed_at >= copy.since and not self._warm(worker, name):
                    await self._drop_copy(name, worker, "it was unloaded")
                elif copy.attached_to is not None and not self._same_weights(name, copy):
                    await self._drop_copy(name, worker, "the weights it attached to are gone")

    def _same_weights(self, name: str, copy: _Copy) -> bool:
        home = self._homes.get(name)
        return (
            home is not None
            and home.index == copy.attached_to
            and home.proc is not None
            and home.proc.pid == copy.home_pid
            and self._warm(home, name)
            and home.models[name].get("loads") == copy.home_loads
        )

    async def _forget_copies_of(self, dead: _Worker) -> None:
        """A worker died: its copies went with it, and so must copies (warm or still
        loading) attached to its memory."""
        for name in list(dead.copies):
            await self._drop_copy(name, dead, "its worker died")
        for worker in self._workers:
            for name, copy in list(worker.copies.items()):
                if copy.attached_to == dead.index:
                    await self._drop_copy(name, worker, "the worker it attached to died")

    def request_counts(self) -> dict[str, float]:
        """Requests answered per model by every worker, as of the last refresh (1 s)."""
        counts: dict[str, float] = {}
        for worker in self._workers:
            for seen in (worker.requests_before, worker.requests):
                for model, n in seen.items():
                    counts[model] = counts.get(model, 0.0) + n
        return counts

    async def metrics(self) -> CollectorRegistry:
        """The workers' serving metrics, scraped from each now and summed per series."""
        texts = await asyncio.gather(
            *(self._metrics_text(w) for w in self._workers if w.up), return_exceptions=True
        )
        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], Sample] = {}
        for text in texts:
            if not isinstance(text, str):
                continue  # a worker that died meanwhile: its series are gone with it
            for family in text_string_to_metric_families(text):
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    seen = values.get(key)
                    if seen is None:
                        values[key] = sample
                    elif sample.name.endswith("_created"):
                        values[key] = seen._replace(value=min(seen.value, sample.value))
                    else:
                        values[key] = seen._replace(value=seen.value + sample.value)
        for (name, _, _), sample in values.items():
            families[name].samples.append(sample)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(list(families.values())))
        return registry

    async def _metrics_text(self, worker: _Worker) -> str:
        assert worker.session is not None
        async with worker.session.get(f"{CONTROL}/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()

    # -- routing -----------------------------------------------------------------------

    def _home(self, name: str) -> _Worker:
        worker = self._homes.get(name)
        if worker is None:
            raise ModelNotFound(name)
        return worker

    def has(self, name: str) -> bool:
        return name in self._homes

    async def forward(self, request: web.Request, name: str) -> web.Response:
        """Send the request to the model's worker; answer 503 if the worker dies.

        The target goes as the caller sent it (``raw_path``: the worker's router decodes
        it exactly as ours did), with only the headers the OIP routes read. HEAD goes as
        GET, whose body aiohttp then leaves out. Inference goes to the least busy copy;
        everything else (metadata, repository load and unload) to the model's home."""
        self._home(name)  # 404 before reading a body for an unknown model
        method = "GET" if request.method == "HEAD" else request.method
        if method not in ("GET", "POST"):
            raise MethodNotAllowed(f"method {request.method[:16]} is not allowed here")
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS]
        path, target = request.path, request.raw_path
        if path.endswith(("/infer", ":predict")):
            status, answer, payload = await self.infer(name, method, target, body, headers)
        else:
            if path.endswith("/unload"):
                await self._drop_copies(name, "the model was unloaded")
            status, answer, payload = await self.relay(
                self._home(name), name, method, target, body, headers
            )
        out = CIMultiDict((k, v) for k, v in answer if k.lower() in _ANSWER_HEADERS)
        return web.Response(body=payload, status=status, headers=out)

    async def infer(
        self, name: str, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """An inference request to the model's least busy copy; if that copy turns out to
        be gone (404) or not warm (503), the model's home answers instead."""
        worker = self._route(name)
        answer = await self.relay(worker, name, method, path, body, headers)
        if answer[0] in (404, 503) and (home := self._home(name)) is not worker:
            answer = await self.relay(home, name, method, path, body, headers)
        return answer

    async def relay(
        self,
        worker: _Worker,
        name: str,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request to ``worker`` about model ``name``, counted while in flight."""
        if not worker.serving or worker.link is None:
            raise WorkerUnavailable(
                f"model '{name}' is on worker {worker.index}, which is restarting"
            )
        inflight = worker.inflight
        inflight[name] = inflight.get(name, 0) + 1
        try:
            return await worker.link.request(method, path, body, headers)
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


def _model_path(name: str, version: str | None) -> str:
    """``/v2/models/NAME[/versions/V]`` for a declared name and a version that can only be
    a version: nothing a gRPC caller puts in ``model_version`` can leave the path."""
    if version is None or version == "":
        return f"/v2/models/{quote(name, safe='')}"
    if not VERSION_PATTERN.fullmatch(version):
        raise InvalidInput(
            f"model version {version[:70]!r} is not a version ([A-Za-z0-9._-], at most 64)"
        )
    return f"/v2/models/{quote(name, safe='')}/versions/{version}"


def _raise_for(status: int, answer: bytes, name: str) -> None:
    """The worker's error answer as the error the gRPC servicer maps to a status code."""
    try:
        doc = json.loads(answer)
        message = str(doc.get("error", "")) if isinstance(doc, dict) else ""
    except ValueError:
        message = ""
    message = message or f"the worker answered {status}"
    if status == 404:
        raise ModelNotFound(message if "version" in message else name)
    if status in (400, 413):
        raise InvalidInput(message)
    if status == 503:
        raise WorkerUnavailable(message)
    raise ModelLoadError(message)


def _attachable(registration: _Registration) -> bool:
    """Whether copies on the home's GPU can attach to its weights (runtimes.ipc)."""
    return registration.fmt == "torch" and bool(registration.entrypoint)


def build_router_app(pool: WorkerPool, catalog: Catalog) -> web.Application:
    """The node socket's app when models live in workers: answers locally what it can."""

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def metadata(_: web.Request) -> web.Response:
        return web.json_response(
            {"name": SERVER_NAME, "version": SERVER_VERSION,
             "extensions": ["model_repository", "binary_tensor_data"]}
        )  # fmt: skip

    async def model(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not pool.has(name):
            reason = catalog.not_ready_reason(name)
            if reason is None:
                raise ModelNotFound(name)
            raise ModelNotReady(f"model '{name}' is not ready: {reason}")
        return await pool.forward(request, name)

    async def index(_: web.Request) -> web.Response:
        entries = []
        for name in pool.names():
            seen = pool.describe(name) or {}
            state = {"Warm": "READY", "Loading": "LOADING"}.get(
                seen.get("state", ""), "UNAVAILABLE"
            )
            entries.append({"name": name, "version": "1", "state": state,
                            "reason": seen.get("error") or ""})  # fmt: skip
        entries.extend(catalog.index())
        return web.json_response(sorted(entries, key=lambda e: e["name"]))

    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", metadata)
    app.router.add_route("*", "/v2/models/{name}{tail:(/.*)?}", model)
    app.router.add_route("*", r"/v1/models/{name:[^/:]+}{tail:(:predict)?}", model)
    app.router.add_post("/v2/repository/index", index)
    app.router.add_post("/v2/repository/models/{name}/{verb:load|unload}", model)
    return app


def worker_devices(devices: list[Device], workers: int | None) -> list[Device]:
    """Default one worker per GPU, else one on the CPU; ``workers`` spreads that many over
    the GPUs (or the CPU), the workers of one device sharing its budget equally."""
    targets = [d for d in devices if d.kind == "cuda"] or [d for d in devices if d.kind == "cpu"]
    count = workers or len(targets)
    per = [sum(1 for i in range(count) if i % len(targets) == t) for t in range(len(targets))]
    return [
        Device(targets[i % len(targets)].name, targets[i % len(targets)].total,
               targets[i % len(targets)].budget // per[i % len(targets)])
        for i in range(count)
    ]  # fmt: skip


class PoolDataPlane:
    """The dataplane operations gRPC needs, answered by the model's worker over REST.

    Tensors cross as raw bytes (the binary tensor data extension): no JSON on this hop.
    """

    def __init__(self, pool: WorkerPool, catalog: Catalog) -> None:
        self.pool = pool
        self.catalog = catalog

    def _worker(self, name: str, version: str | None = None) -> _Worker:
        """The model's home; the same 404s and 400s for names and versions as in-process."""
        if not self.pool.has(name):
            reason = self.catalog.not_ready_reason(name)
            if reason is None:
                raise ModelNotFound(name)
            raise ModelNotReady(f"model '{name}' is not ready: {reason}")
        if version:
            _model_path(name, version)  # refuses what cannot be a version
            if version != MODEL_VERSION:
                raise ModelNotFound(name, version)
        return self.pool._home(name)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION,
                "extensions": ["model_repository", "binary_tensor_data"]}  # fmt: skip

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self._worker(name, version)
        seen = self.pool.describe(name) or {}
        return seen.get("state") != "Error"

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        worker = self._worker(name, version)
        status, _, answer = await self.pool.relay(
            worker, name, "GET", _model_path(name, version), b"", []
        )
        if status != 200:
            _raise_for(status, answer, name)
        doc: dict[str, Any] = json.loads(answer)
        return doc

    async def infer(
        self,
        name: str,
        request: InferRequest,
        version: str | None = None,
        *,
        protocol: str = "grpc",
    ) -> InferResponse:
        self._worker(name, version)
        path = _model_path(name, version) + "/infer"
        size = tensor_bytes(request.inputs)
        body, json_length = await sized_work(size, encode_request, request, binary=True)
        headers = [(PROTOCOL_HEADER, protocol), (HEADER_LENGTH, str(json_length))]
        status, answer_headers, answer = await self.pool.infer(name, "POST", path, body, headers)
        length = next((v for k, v in answer_headers if k.lower() == HEADER_LENGTH.lower()), None)
        if status != 200:
            _raise_for(status, answer, name)
        result = await sized_work(
            len(answer), decode_response, answer, int(length) if length else None
        )
        result.model_name = name
        return result

    async def load(self, name: str) -> None:
        await self.pool.load(name, evict=True)

    async def unload(self, name: str) -> None:
        self._worker(name)
        await self.pool.unload(name)
