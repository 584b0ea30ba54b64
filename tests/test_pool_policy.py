"""The pool's decisions (homes, routes, copies), from plain state tables, without processes.

The processes are exercised end to end in tests/test_workers.py; here each race the
bookkeeping must survive is set up exactly: statuses that predate a copy, homes that
reload or restart under an attached copy, copies still loading when a worker dies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodecache.serve import worker
from nodecache.serve.devices import Device
from nodecache.serve.pool import messages
from nodecache.serve.pool.policy import (
    COPY_IDLE,
    CopyState,
    PoolTable,
    WorkerState,
    attaches,
    choose_home,
    copies_lost_with,
    copy_spec,
    copy_target,
    describe,
    may_delete_copy,
    route,
    stale_copies,
)
from nodecache.serve.pool.supervisor import Supervisor
from nodecache.serve.settings import ServeSettings
from nodecache.serve.spec import ModelPolicy, ModelSpec

GIB = 1 << 30
NOW = 1000.0
CPU_CUDA = frozenset({"cpu", "cuda"})


def table(*devices: Device, spread_at: int = 2) -> PoolTable:
    """Workers that are up, with pids 100, 101, ..."""
    workers = [
        WorkerState(i, Device(d.name, d.total, d.budget), up=True, pid=100 + i)
        for i, d in enumerate(devices)
    ]
    return PoolTable(workers, spread_at=spread_at)


def warm(worker: WorkerState, name: str, loads: int = 1, at: float = NOW) -> None:
    worker.models[name] = {"state": "Warm", "residentBytes": GIB, "loads": loads}
    worker.refreshed_at = at


def home_of(pool: PoolTable, name: str, fmt: str = "torch", index: int = 0) -> WorkerState:
    home = pool.workers[index]
    home.registrations[name] = ModelSpec(name, Path("/m"), fmt, "net:Net", size_hint=GIB)
    pool.homes[name] = home
    warm(home, name)
    return home


def add_copy(pool: PoolTable, name: str, worker: WorkerState, copy: CopyState) -> None:
    """What the pool records once a copy loaded."""
    worker.copies[name] = copy
    pool.copies.setdefault(name, []).append(worker)


def test_a_copy_that_loaded_after_the_last_status_takes_requests() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, 4 * GIB))
    home = home_of(pool, "m")
    other = pool.workers[1]
    other.refreshed_at = NOW  # a status from before the copy existed
    add_copy(pool, "m", other, CopyState(since=NOW + 1))
    home.inflight["m"] = 3
    assert route(pool, "m", NOW + 2) == (other, False)  # the least busy warm holder
    assert stale_copies(pool) == []  # the old status does not count against it

    other.refreshed_at = NOW + 3  # a status asked for after it loaded: gone
    assert stale_copies(pool) == [("m", other, "it was unloaded")]
    assert not may_delete_copy(pool, "m", home) and may_delete_copy(pool, "m", other)


def test_a_loading_copy_takes_no_requests_and_the_home_wins_ties() -> None:
    pool = table(*[Device("cpu", 8 * GIB, 4 * GIB)] * 3)
    home = home_of(pool, "m")
    loading, ready = pool.workers[1], pool.workers[2]
    add_copy(pool, "m", loading, CopyState())  # since == 0: still loading
    add_copy(pool, "m", ready, CopyState(since=NOW + 1))
    assert route(pool, "m", NOW)[0] is home  # equally idle: the home
    home.inflight["m"] = 1
    assert route(pool, "m", NOW)[0] is ready
    ready.up = False
    assert route(pool, "m", NOW)[0] is home  # a worker that is down takes nothing


def test_a_hot_model_asks_for_a_copy_unless_one_is_coming_or_it_must_wait() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, 4 * GIB))
    home = home_of(pool, "m")
    assert route(pool, "m", NOW) == (home, False)
    home.inflight["m"] = 2  # spread_at
    assert route(pool, "m", NOW) == (home, True)
    pool.spreading.add("m")
    assert route(pool, "m", NOW) == (home, False)
    pool.spreading.clear()
    pool.spread_after["m"] = NOW + 5
    assert route(pool, "m", NOW) == (home, False)
    assert route(pool, "m", NOW + 5) == (home, True)
    pool.spread_at = 0  # never
    assert route(pool, "m", NOW + 5) == (home, False)


def test_copies_go_only_where_they_fit_and_never_twice() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, GIB // 2))
    home_of(pool, "m")
    assert copy_target(pool, "m", CPU_CUDA) is None  # 1 GiB does not fit in 0.5 GiB
    pool.workers[1].device.budget = 4 * GIB
    assert copy_target(pool, "m", CPU_CUDA) is pool.workers[1]
    add_copy(pool, "m", pool.workers[1], CopyState(since=NOW))
    assert copy_target(pool, "m", CPU_CUDA) is None


def test_no_copy_of_a_model_that_is_not_warm_or_onto_a_worker_that_is_down() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, 4 * GIB))
    home = home_of(pool, "m")
    pool.workers[1].restoring = True
    assert copy_target(pool, "m", CPU_CUDA) is None
    pool.workers[1].restoring = False
    home.models["m"]["state"] = "Loading"
    assert copy_target(pool, "m", CPU_CUDA) is None


@pytest.mark.parametrize("change", ["reloaded", "restarted", "unloaded"])
def test_an_attached_copy_goes_when_the_homes_weights_do(change: str) -> None:
    pool = table(Device("cuda:0", 80 * GIB, 30 * GIB), Device("cuda:0", 80 * GIB, 30 * GIB))
    home = home_of(pool, "m")
    other = pool.workers[1]
    assert attaches(home.registrations["m"], home, other)
    add_copy(pool, "m", other, CopyState(attached_to=0, home_pid=100, home_loads=1, since=NOW))
    warm(other, "m", at=NOW + 1)
    assert stale_copies(pool) == []  # same process, same load: kept

    if change == "reloaded":  # evicted and loaded again between two statuses
        warm(home, "m", loads=2)
    elif change == "restarted":
        home.pid = 999
    else:
        home.models["m"]["state"] = "Downloaded"
    assert stale_copies(pool) == [("m", other, "the weights it attached to are gone")]


def test_a_dead_home_takes_attached_copies_with_it_even_loading_ones() -> None:
    pool = table(*[Device("cuda:0", 80 * GIB, 20 * GIB)] * 3)
    home = home_of(pool, "m")
    home_of(pool, "n")
    add_copy(pool, "m", pool.workers[1], CopyState(attached_to=0, home_pid=100, since=NOW))
    pool.workers[2].copies["n"] = CopyState(attached_to=0, home_pid=100, home_loads=1)  # loading
    home.copies["k"] = CopyState()  # a copy of another model on the dead worker itself
    lost = copies_lost_with(pool, home)
    assert {(name, w.index) for name, w, _ in lost} == {("k", 0), ("m", 1), ("n", 2)}


def test_a_copy_is_never_deleted_from_the_models_new_home() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, 4 * GIB))
    home_of(pool, "m")
    other = pool.workers[1]
    add_copy(pool, "m", other, CopyState(since=NOW))
    pool.homes["m"] = other  # the model is re-declared and its new home is the copy's worker
    assert not may_delete_copy(pool, "m", other)


def test_onnx_copies_do_not_expect_to_attach_on_the_same_gpu() -> None:
    pool = table(
        Device("cuda:0", 80 * GIB, 2 * GIB),
        Device("cuda:1", 80 * GIB, 8 * GIB),
        Device("cuda:0", 80 * GIB, GIB // 2),
    )
    home = home_of(pool, "m", fmt="onnx")
    # cuda:0's other worker has no room for a second 1 GiB: the copy goes to cuda:1.
    target = copy_target(pool, "m", CPU_CUDA)
    assert target is not None and target.device.name == "cuda:1"
    # A torch module class could attach there, so it is tried first.
    home.registrations["m"] = ModelSpec("m", Path("/m"), "torch", "net:Net", size_hint=GIB)
    assert copy_target(pool, "m", CPU_CUDA) is pool.workers[2]


def test_a_copy_is_registered_unpinned_soon_idle_and_never_loading_itself() -> None:
    spec = ModelSpec("m", Path("/m"), "torch", "net:Net", pinned=True, size_hint=GIB)
    copy = copy_spec(spec, attach=True)
    assert (copy.pinned, copy.idle_timeout, copy.size_hint, copy.on_demand) == (
        False,
        COPY_IDLE,
        0,
        False,
    )
    assert copy_spec(spec.with_policy(ModelPolicy(idle_timeout=5.0)), False).idle_timeout == 5.0
    assert copy_spec(spec, attach=False).size_hint == GIB


def test_homes_go_where_the_most_budget_is_unreserved() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, 3 * GIB))
    assert choose_home(pool, "a", CPU_CUDA) is pool.workers[0]
    pool.workers[0].registrations["a"] = ModelSpec("a", Path("/a"), "onnx", size_hint=2 * GIB)
    assert choose_home(pool, "b", CPU_CUDA) is pool.workers[1]
    # Not where a copy of the same name may still be going away.
    pool.workers[1].copies["b"] = CopyState()
    assert choose_home(pool, "b", CPU_CUDA) is pool.workers[0]
    # No worker of a kind the format can use: any worker still takes it.
    assert choose_home(pool, "c", frozenset({"cuda"})) is pool.workers[1]


def test_describe_says_a_restarting_worker_holds_nothing_warm() -> None:
    pool = table(Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, 4 * GIB))
    home = home_of(pool, "m")
    add_copy(pool, "m", pool.workers[1], CopyState(since=NOW))
    seen = describe(pool, "m")
    assert seen is not None and seen["state"] == "Warm" and seen["worker"] == 0
    assert seen["copies"] == [{"worker": 1, "device": "cpu", "attached": False, "requests": 0.0}]
    home.restoring = True
    seen = describe(pool, "m")
    assert seen is not None and seen["state"] == "Downloaded"
    assert seen["error"] == "worker 0 is restarting"
    assert describe(pool, "nope") is None


def test_control_messages_read_back_what_they_wrote() -> None:
    spec = ModelSpec("m", Path("/m"), "torch", "net:Net", True, 5.0, GIB, (8, 0.01), False)
    assert messages.Register.from_json("m", messages.Register(spec).to_json()).spec == spec
    policy = messages.Policy(spec.policy)
    assert messages.Policy.from_json(policy.to_json()) == policy
    load = messages.Load(evict=False, weights={"device": "cuda:0"})
    assert messages.Load.from_json(load.to_json()) == load
    assert messages.Load.from_json({}) == messages.Load(evict=True)
    weights = messages.Weights({"tensors": {}}, 3)
    assert messages.Weights.from_json(weights.to_json()) == weights
    assert messages.model_route("m", "load") == "/nodecache/v1/worker/models/m/load"


def test_the_worker_command_line_carries_every_setting(tmp_path: Path) -> None:
    settings = ServeSettings(model_concurrency=3, model_queue=9, idle_check_seconds=0.5,
                             spread_at=0, log_format="json")  # fmt: skip
    workers = [WorkerState(0, Device("cuda:0", 80 * GIB, 8 * GIB))]
    supervisor = Supervisor(workers, tmp_path, settings, on_death=lambda _: asyncio.sleep(0))
    command = supervisor.command(supervisor.processes[0])
    assert command[1:4] == ["-I", "-m", "nodecache.serve.worker"]
    args = worker.parse_args(command[4:])
    assert ServeSettings.from_arguments(args) == settings
    assert (args.device, args.budget) == ("cuda:0", 8 * GIB)
    assert args.control_socket == str(tmp_path / "workers" / "worker-0.control.sock")
