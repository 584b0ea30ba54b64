"""The pool's bookkeeping of extra copies, step by step, without worker processes.

The processes are exercised end to end in tests/test_workers.py; here each race the
bookkeeping must survive is set up exactly: statuses that predate a copy, homes that
reload or restart under an attached copy, copies still loading when a worker dies."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nodecache.serve.devices import Device
from nodecache.serve.workers import WorkerPool, _Copy, _Registration, _Worker

GIB = 1 << 30


class FakePool(WorkerPool):
    """A pool over workers that are up, answering control calls from a script."""

    def __init__(self, devices: list[Device]) -> None:
        super().__init__(devices, Path("/nonexistent"), spread_at=2)
        self.calls: list[tuple[int, str, str]] = []
        self.loads = 0
        for pid, worker in enumerate(self._workers, start=100):
            worker.up, worker.session = True, object()  # type: ignore[assignment]
            worker.proc = SimpleNamespace(pid=pid)  # type: ignore[assignment]

    async def _call(self, worker: _Worker, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((worker.index, method, path))
        if path.endswith("/weights"):
            return {"weights": {"device": worker.device.name, "tensors": {}}, "loads": 1}
        return {}


def warm(worker: _Worker, name: str, loads: int = 1) -> None:
    worker.models[name] = {"state": "Warm", "residentBytes": GIB, "loads": loads}
    worker.refreshed_at = time.monotonic()


def home_of(pool: FakePool, name: str, fmt: str = "torch") -> _Worker:
    home = pool._workers[0]
    home.registrations[name] = _Registration(Path("/m"), fmt, "net:Net", False, None, GIB)
    pool._homes[name] = home
    warm(home, name)
    return home


async def test_a_copy_that_loaded_after_the_last_status_takes_requests() -> None:
    pool = FakePool([Device("cpu", 8 * GIB, 4 * GIB)] * 2)
    home = home_of(pool, "m")
    other = pool._workers[1]
    other.refreshed_at = time.monotonic()  # a status from before the copy existed
    await pool._make_copy("m", home, other)
    assert pool._copies["m"] == [other] and other.copies["m"].attached_to is None
    assert ("m" not in other.models) and pool._routable(other, "m")
    home.inflight["m"] = 3
    assert pool._route("m") is other  # the least busy warm holder

    await pool._prune_copies()  # the old status does not count against it
    assert pool._copies["m"] == [other]
    other.refreshed_at = time.monotonic()  # a status asked for after it loaded: gone
    await pool._prune_copies()
    assert "m" not in pool._copies and "m" not in other.copies
    assert (1, "DELETE", "/nodecache/v1/worker/models/m") in pool.calls
    assert pool._route("m") is home


async def test_copies_go_only_where_they_fit_and_never_twice() -> None:
    pool = FakePool([Device("cpu", 8 * GIB, 4 * GIB), Device("cpu", 8 * GIB, GIB // 2)])
    home = home_of(pool, "m")
    assert pool._copy_target("m", home) is None  # 1 GiB does not fit in 0.5 GiB
    pool._workers[1].device.budget = 4 * GIB
    assert pool._copy_target("m", home) is pool._workers[1]
    await pool._make_copy("m", home, pool._workers[1])
    assert pool._copy_target("m", home) is None


@pytest.mark.parametrize("change", ["reloaded", "restarted", "unloaded"])
async def test_an_attached_copy_goes_when_the_homes_weights_do(change: str) -> None:
    pool = FakePool([Device("cuda:0", 80 * GIB, 30 * GIB)] * 2)
    home = home_of(pool, "m")
    other = pool._workers[1]
    await pool._make_copy("m", home, other)
    copy = other.copies["m"]
    assert (copy.attached_to, copy.home_pid, copy.home_loads) == (0, 100, 1)
    warm(other, "m")
    await pool._prune_copies()
    assert pool._copies["m"] == [other]  # same process, same load: kept

    if change == "reloaded":  # evicted and loaded again between two statuses
        warm(home, "m", loads=2)
    elif change == "restarted":
        home.proc = SimpleNamespace(pid=999)  # type: ignore[assignment]
    else:
        home.models["m"]["state"] = "Downloaded"
    await pool._prune_copies()
    assert "m" not in pool._copies and "m" not in other.copies


async def test_a_dead_home_takes_attached_copies_with_it_even_loading_ones() -> None:
    pool = FakePool([Device("cuda:0", 80 * GIB, 20 * GIB)] * 3)
    home = home_of(pool, "m")
    home_of(pool, "n")
    loading = pool._workers[2]
    loading.copies["n"] = _Copy(attached_to=0, home_pid=100, home_loads=1)  # since == 0
    await pool._make_copy("m", home, pool._workers[1])
    home.up = False
    await pool._forget_copies_of(home)
    assert all(not w.copies for w in pool._workers)
    assert "m" not in pool._copies
    deletes = {(i, path) for i, method, path in pool.calls if method == "DELETE"}
    assert deletes == {(1, "/nodecache/v1/worker/models/m"), (2, "/nodecache/v1/worker/models/n")}


async def test_a_copy_is_never_deleted_from_the_models_new_home() -> None:
    pool = FakePool([Device("cpu", 8 * GIB, 4 * GIB)] * 2)
    home = home_of(pool, "m")
    other = pool._workers[1]
    await pool._make_copy("m", home, other)
    # The model is re-declared and its new home is the copy's worker.
    pool._homes["m"] = other
    await pool._drop_copy("m", other, "test")
    assert not [c for c in pool.calls if c[1] == "DELETE"]


async def test_onnx_copies_do_not_expect_to_attach_on_the_same_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "nodecache.serve.workers.device_kinds", lambda fmt: frozenset({"cpu", "cuda"})
    )
    pool = FakePool([Device("cuda:0", 80 * GIB, 2 * GIB), Device("cuda:1", 80 * GIB, 8 * GIB)])
    pool._workers.append(
        _Worker(2, Device("cuda:0", 80 * GIB, GIB // 2), Path("/x"), Path("/x.control"))
    )
    pool._workers[2].up, pool._workers[2].session = True, object()  # type: ignore[assignment]
    home = home_of(pool, "m", fmt="onnx")
    # cuda:0's other worker has no room for a second 1 GiB: the copy goes to cuda:1.
    target = pool._copy_target("m", home)
    assert target is not None and target.device.name == "cuda:1"
    # A torch module class could attach there, so it is tried first.
    home.registrations["m"] = _Registration(Path("/m"), "torch", "net:Net", False, None, GIB)
    assert pool._copy_target("m", home) is pool._workers[2]
