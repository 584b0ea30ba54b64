"""The warm pool: budgets hold, LRU order holds, pinned models stay, idle ones leave."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.devices import Device
from nodecache.serve.errors import ServeError
from nodecache.serve.protocol import InferRequest
from nodecache.serve.repository import ModelRepository
from nodecache.serve.residency import Candidate, choose_victims, idle_models
from nodecache.serve.runtimes import TensorSpec, register_runtime

MB = 1 << 20


class FakeRuntime:
    """Answers x * its model's factor; holds exactly the bytes of its weight file."""

    platform = "fake"

    def __init__(self, model_dir: Path) -> None:
        self.factor = float((model_dir / "factor").read_text())
        self.resident_bytes = (model_dir / "weights").stat().st_size
        self.inputs = [TensorSpec("x", "FP32", (-1,))]
        self.outputs = [TensorSpec("y", "FP32", (-1,))]

    def predict(self, inputs, names):  # type: ignore[no-untyped-def]
        return {"y": inputs["x"] * self.factor}

    def unload(self) -> None:
        pass


register_runtime("fake", lambda d, *, device, entrypoint: FakeRuntime(d))


def fake_model(root: Path, name: str, factor: float, size: int) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "factor").write_text(str(factor))
    with open(folder / "weights", "wb") as f:
        f.truncate(size)
    return folder


def make_repo(tmp_path: Path, budget: int, sizes: dict[str, int], **pinned: bool):
    cpu = Device("cpu", total=budget * 4, budget=budget)
    repo = ModelRepository([cpu])
    for i, (name, size) in enumerate(sizes.items()):
        folder = fake_model(tmp_path, name, factor=i + 2, size=size)
        # size_hint is the file size the store reports (weights dominate).
        repo.register(name, folder, "fake", pinned=pinned.get(name, False), size_hint=size)
    return repo, cpu


async def ask(dp: DataPlane, name: str, value: float) -> float:
    request = InferRequest(inputs={"x": np.array([value], np.float32)})
    response = await dp.infer(name, request)
    return float(response.outputs["y"][0])


async def test_budget_smaller_than_three_models(tmp_path: Path) -> None:
    repo, cpu = make_repo(tmp_path, 25 * MB, {"a": 10 * MB, "b": 10 * MB, "c": 10 * MB})
    dp = DataPlane(repo)
    factors = {"a": 2, "b": 3, "c": 4}
    sequence = ["a", "b", "c", "a", "b", "c", "a", "c", "b"]
    for step, name in enumerate(sequence):
        assert await ask(dp, name, step) == step * factors[name]
        assert cpu.used <= cpu.budget
        warm = {m.name for m in repo.models() if m.runtime is not None}
        assert name in warm and len(warm) <= 2
    # After ... c, b: the least recently used (a) is the one that left.
    assert {m.name for m in repo.models() if m.runtime} == {"c", "b"}
    assert cpu.used == 20 * MB


async def test_lru_order_decides_the_victim(tmp_path: Path) -> None:
    repo, _ = make_repo(tmp_path, 25 * MB, {"a": 10 * MB, "b": 10 * MB, "c": 10 * MB})
    dp = DataPlane(repo)
    await ask(dp, "a", 1)
    await ask(dp, "b", 1)
    await asyncio.sleep(0.01)
    await ask(dp, "a", 1)  # a is now more recent than b
    await ask(dp, "c", 1)
    assert {m.name for m in repo.models() if m.runtime} == {"a", "c"}


async def test_pinned_model_never_leaves(tmp_path: Path) -> None:
    sizes = {"p": 10 * MB, "b": 10 * MB, "c": 10 * MB}
    repo, cpu = make_repo(tmp_path, 25 * MB, sizes, p=True)
    dp = DataPlane(repo)
    await repo.load("p")
    for _ in range(3):
        for name in ("b", "c"):
            await ask(dp, name, 1)
            assert repo.get("p").runtime is not None
            assert cpu.used <= cpu.budget
    # Idle timeouts do not apply to pinned models either.
    repo.get("p").idle_timeout = 0.0
    assert "p" not in await repo.unload_idle()


async def test_no_room_is_a_503_with_a_reason_not_an_oom(tmp_path: Path) -> None:
    repo, cpu = make_repo(tmp_path, 15 * MB, {"p": 10 * MB, "b": 10 * MB}, p=True)
    await repo.load("p")
    with pytest.raises(ServeError) as err:
        await DataPlane(repo).infer("b", InferRequest(inputs={"x": np.ones(1, np.float32)}))
    assert err.value.status == 503 and err.value.retry_after
    assert "needs 10485760 bytes" in str(err.value) and "pinned or busy" in str(err.value)
    assert repo.get("b").state == "Downloaded" and cpu.used == 10 * MB


async def test_busy_model_is_not_evicted(tmp_path: Path) -> None:
    repo, _ = make_repo(tmp_path, 15 * MB, {"a": 10 * MB, "b": 10 * MB})
    async with repo.use("a"):  # a request holds a
        with pytest.raises(ServeError, match="pinned or busy"):
            await repo.load("b")
    await repo.load("b")  # once a is free it can go
    assert repo.get("a").runtime is None and repo.get("b").runtime is not None


async def test_idle_models_unload_after_their_timeout(tmp_path: Path) -> None:
    repo, cpu = make_repo(tmp_path, 100 * MB, {"a": 10 * MB, "b": 10 * MB})
    repo.get("a").idle_timeout = 60.0
    await repo.load("a")
    await repo.load("b")  # no timeout: stays
    now = repo.get("a").last_used
    assert await repo.unload_idle(now + 30) == []
    assert await repo.unload_idle(now + 61) == ["a"]
    assert repo.get("a").state == "Downloaded" and repo.get("b").state == "Warm"
    assert cpu.used == 10 * MB


async def test_prewarm_does_not_evict(tmp_path: Path) -> None:
    repo, _ = make_repo(tmp_path, 15 * MB, {"a": 10 * MB, "b": 10 * MB})
    await repo.load("a")
    with pytest.raises(ServeError):
        await repo.load("b", evict=False)
    assert repo.get("a").runtime is not None


async def test_waiting_requests_are_bounded(tmp_path: Path) -> None:
    cpu = Device("cpu", 0, 1 << 30)
    repo = ModelRepository([cpu], max_inflight_per_model=2)
    repo.register("a", fake_model(tmp_path, "a", 2, MB), "fake")
    async with repo.use("a"), repo.use("a"):
        with pytest.raises(ServeError) as err:
            async with repo.use("a"):
                pass
    assert err.value.status == 503 and err.value.retry_after


def test_policy_pure() -> None:
    warm = [
        Candidate("old", 5, last_used=1),
        Candidate("pinned", 50, last_used=0, pinned=True),
        Candidate("busy", 50, last_used=0, busy=True),
        Candidate("new", 5, last_used=9),
    ]
    assert choose_victims(warm, needed=5, free=10) == []
    assert choose_victims(warm, needed=12, free=5) == ["old", "new"]
    assert choose_victims(warm, needed=100, free=5) is None
    assert idle_models(warm, {"old": 5, "pinned": 1, "busy": 1}, now=10) == ["old"]
