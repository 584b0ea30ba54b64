"""Where a pool's models live and which copy answers: pure decisions over a state table.

The table (``PoolTable``) is what the pool knows of its workers: per worker its device and
free bytes, whether it serves, the last status it gave (models and their state), requests in
flight, and the extra copies it holds. Functions here read it and decide (a home, a route, a
copy target, the copies to drop); the pool does the I/O and keeps the table current. No I/O,
no clock: the caller passes ``now``.

A hot model spreads: when every worker holding it already has ``spread_at`` of its requests
in flight, another worker with room gets an extra copy (never by evicting) and inference goes
to the least busy one. A copy on the home's GPU attaches to the home's weights (CUDA IPC).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from nodecache.serve.devices import Device
from nodecache.serve.spec import ModelSpec, ModelState

__all__ = [
    "COPY_IDLE",
    "FAILED_RETRY",
    "NO_ROOM_RETRY",
    "CopyState",
    "PoolTable",
    "WorkerState",
    "attaches",
    "choose_home",
    "copies_lost_with",
    "copy_spec",
    "copy_target",
    "describe",
    "may_delete_copy",
    "routable",
    "route",
    "same_weights",
    "stale_copies",
    "worker_devices",
]

COPY_IDLE = 60.0
"""An extra copy unloads after this long without requests (sooner if the model's own
idle timeout is shorter)."""
NO_ROOM_RETRY = 5.0
"""After finding no worker with room for a copy, the next look for that model."""
FAILED_RETRY = 30.0
"""After a copy failed to load, the next try for that model."""


@dataclass
class CopyState:
    """A model warm (or loading) on a worker besides its home."""

    attached_to: int | None = None  # the worker whose GPU weights it uses (CUDA IPC)
    home_pid: int | None = None  # that worker's process when it exported them
    home_loads: int | None = None  # and how many times it had loaded the model by then
    since: float = 0.0  # when it became routable (monotonic); 0 while it loads


@dataclass
class WorkerState:
    """What the pool knows of one worker."""

    index: int
    device: Device
    up: bool = False
    # Between a restart and its models being registered again: routed requests get 503,
    # not the new worker's 404 for a model it does not know yet.
    restoring: bool = False
    pid: int | None = None
    restarts: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # last status seen
    refreshed_at: float = 0.0  # when the status in ``models`` was asked for (monotonic)
    requests: dict[str, float] = field(default_factory=dict)  # answered, as last seen
    requests_before: dict[str, float] = field(default_factory=dict)  # by earlier processes
    registrations: dict[str, ModelSpec] = field(default_factory=dict)  # homes and copies
    copies: dict[str, CopyState] = field(default_factory=dict)  # loading or warm here
    inflight: dict[str, int] = field(default_factory=dict)  # relayed requests, per model

    @property
    def serving(self) -> bool:
        return self.up and not self.restoring

    @property
    def reserved(self) -> int:
        return sum(spec.size_hint or 0 for spec in self.registrations.values())

    def warm(self, name: str) -> bool:
        return self.serving and self.models.get(name, {}).get("state") == ModelState.WARM

    def warm_homes(self) -> list[str]:
        """The models this worker's last status said were warm, to reload after a crash."""
        return [
            n
            for n, m in self.models.items()
            if m.get("state") == ModelState.WARM and n in self.registrations
        ]


@dataclass
class PoolTable:
    """The pool's whole state: workers, each model's home and its extra copies."""

    workers: list[WorkerState]
    spread_at: int  # in-flight requests per copy that call for another copy; 0: never
    homes: dict[str, WorkerState] = field(default_factory=dict)
    copies: dict[str, list[WorkerState]] = field(default_factory=dict)  # in the order made
    spreading: set[str] = field(default_factory=set)  # a copy is being made
    spread_after: dict[str, float] = field(default_factory=dict)  # no new copy before


def choose_home(table: PoolTable, name: str, kinds: frozenset[str]) -> WorkerState:
    """The worker of a device kind the model can use with the most unreserved budget; never
    one where a copy of the same name may still be going away."""
    usable = [w for w in table.workers if w.device.kind in kinds and name not in w.copies]
    usable = usable or table.workers
    return max(usable, key=lambda w: w.device.budget - w.reserved)


def routable(worker: WorkerState, name: str) -> bool:
    """A copy takes requests until a status asked for after it loaded says it is gone."""
    copy = worker.copies.get(name)
    if copy is None or not copy.since or not worker.serving:
        return False
    return worker.refreshed_at < copy.since or worker.warm(name)


def route(table: PoolTable, name: str, now: float) -> tuple[WorkerState, bool]:
    """The model's least busy warm worker (its home on ties), and whether the model is hot
    enough there for another copy to be made now."""
    worker = table.homes[name]
    copies = table.copies.get(name)
    if copies:
        best, key = worker, (not worker.warm(name), worker.inflight.get(name, 0))
        for copy in copies:
            if (k := (False, copy.inflight.get(name, 0))) < key and routable(copy, name):
                best, key = copy, k
        worker = best
    spread = bool(
        table.spread_at
        and worker.inflight.get(name, 0) >= table.spread_at
        and name not in table.spreading
        and now >= table.spread_after.get(name, 0.0)
    )
    return worker, spread


def attaches(spec: ModelSpec, home: WorkerState, target: WorkerState) -> bool:
    """Whether a copy on ``target`` attaches to the home's weights (same GPU, and a model
    whose runtime can share them)."""
    return (
        spec.attachable and target.device.kind == "cuda" and target.device.name == home.device.name
    )


def copy_target(table: PoolTable, name: str, kinds: frozenset[str]) -> WorkerState | None:
    """A serving worker that does not hold the model and has room for it: on the home's
    GPU first (it can attach to the weights there), then the one with the most free."""
    home = table.homes[name]
    if not home.warm(name):
        return None
    spec = home.registrations[name]
    needed = home.models[name].get("residentBytes") or spec.size_hint or 0
    usable = [
        w
        for w in table.workers
        if w is not home
        and w.serving
        and name not in w.copies
        and w.device.kind in kinds
        and (attaches(spec, home, w) or needed <= w.device.free)
    ]
    return max(usable, key=lambda w: (attaches(spec, home, w), w.device.free), default=None)


def copy_spec(spec: ModelSpec, attach: bool) -> ModelSpec:
    """How a copy is registered: never pinned, soon idle, loaded only on the pool's word,
    and charging nothing when it attaches to the home's memory."""
    return replace(
        spec,
        pinned=False,
        idle_timeout=min(spec.idle_timeout or COPY_IDLE, COPY_IDLE),
        size_hint=0 if attach else spec.size_hint,
        on_demand=False,
    )


def same_weights(table: PoolTable, name: str, copy: CopyState) -> bool:
    """Whether the home still holds the very weights an attached copy uses: the same
    process, and no reload since they were exported."""
    home = table.homes.get(name)
    return (
        home is not None
        and home.index == copy.attached_to
        and home.pid is not None
        and home.pid == copy.home_pid
        and home.warm(name)
        and home.models[name].get("loads") == copy.home_loads
    )


def stale_copies(table: PoolTable) -> list[tuple[str, WorkerState, str]]:
    """Copies to drop, with why: those their worker unloaded (idle, evicted), and those
    attached to a home's GPU memory once the home no longer holds those weights."""
    stale = []
    for name, holders in table.copies.items():
        for worker in holders:
            copy = worker.copies.get(name)
            if copy is None:
                stale.append((name, worker, "it is no longer tracked"))
            elif worker.refreshed_at >= copy.since and not worker.warm(name):
                stale.append((name, worker, "it was unloaded"))
            elif copy.attached_to is not None and not same_weights(table, name, copy):
                stale.append((name, worker, "the weights it attached to are gone"))
    return stale


def copies_lost_with(table: PoolTable, dead: WorkerState) -> list[tuple[str, WorkerState, str]]:
    """A worker died: its copies went with it, and so did copies (warm or still loading)
    attached to its memory."""
    lost = [(name, dead, "its worker died") for name in dead.copies]
    for worker in table.workers:
        for name, copy in worker.copies.items():
            if copy.attached_to == dead.index and worker is not dead:
                lost.append((name, worker, "the worker it attached to died"))
    return lost


def may_delete_copy(table: PoolTable, name: str, worker: WorkerState) -> bool:
    """A dropped copy is unregistered on its worker, unless that worker became the model's
    home meanwhile (a re-declared model may have landed there)."""
    return table.homes.get(name) is not worker


def describe(table: PoolTable, name: str) -> dict[str, Any] | None:
    """The model's serving status as its home last reported it, with its copies."""
    worker = table.homes.get(name)
    if worker is None:
        return None
    seen = dict(worker.models.get(name) or {"state": ModelState.DOWNLOADED.value})
    if not worker.serving:
        seen.update(state=ModelState.DOWNLOADED.value, error=f"worker {worker.index} is restarting")
    seen["worker"] = worker.index
    copies = [
        {
            "worker": w.index,
            "device": w.device.name,
            "attached": w.copies[name].attached_to is not None,
            "requests": w.requests.get(name, 0.0),
        }
        for w in table.copies.get(name, ())
    ]
    if copies:
        seen["copies"] = copies
    return seen


def worker_devices(devices: list[Device], workers: int | None) -> list[Device]:
    """Default one worker per GPU, else one on the CPU; ``workers`` spreads that many over
    the GPUs (or the CPU), the workers of one device sharing its budget equally."""
    targets = [d for d in devices if d.kind == "cuda"] or [d for d in devices if d.kind == "cpu"]
    count = workers or len(targets)
    per = [sum(1 for i in range(count) if i % len(targets) == t) for t in range(len(targets))]
    return [
        Device(
            targets[i % len(targets)].name,
            targets[i % len(targets)].total,
            targets[i % len(targets)].budget // per[i % len(targets)],
        )
        for i in range(count)
    ]
