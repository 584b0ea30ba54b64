"""The serving path: KServe V1, limits, backpressure under a flood, batching, clients."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import threading
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
from support import Agent, declaration

from nodecache.serve.batching import Batcher
from nodecache.serve.client import ClientError, NodeClient, SyncNodeClient
from nodecache.serve.dataplane import DataPlane
from nodecache.serve.devices import Device
from nodecache.serve.errors import ServeError
from nodecache.serve.protocol import InferRequest
from nodecache.serve.repository import ModelRepository
from nodecache.serve.runtimes import TensorSpec, register_runtime

SLOW_PY = """
import time
import numpy as np
from nodecache.serve import Model


class Slow(Model):
    def predict(self, inputs):
        time.sleep(0.05)
        return {"y": inputs["x"] * 2}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlp_dir: Path):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("serving")
    slow = home / "slow"
    slow.mkdir()
    (slow / "slow.py").write_text(SLOW_PY)
    agent = Agent(home / "agent")
    group = grp.getgrgid(os.getgid()).gr_name
    agent.start("--model-concurrency", "2", "--model-queue", "32", "--socket-group", group)
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.declare(
        "slow.yaml", declaration("slow", slow.as_uri(), runtime="python", entrypoint="slow:Slow")
    )
    agent.wait_state("mlp", "Warm")
    agent.wait_state("slow", "Warm")
    yield agent
    agent.stop()


def reference(mlp_dir: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]


def test_kserve_v1_predict(served: Agent, mlp_dir: Path) -> None:
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    code, answer = served.request("POST", "/v1/models/mlp:predict", {"instances": x.tolist()})
    assert code == 200, answer
    np.testing.assert_allclose(answer["predictions"], reference(mlp_dir, x), rtol=1e-5)
    assert served.request("GET", "/v1/models/mlp") == (200, {"name": "mlp", "ready": True})
    code, err = served.request("POST", "/v1/models/mlp:predict", {"rows": []})
    assert code == 400 and "instances" in err["error"]
    assert served.request("POST", "/v1/models/nope:predict", {"instances": [[0]]})[0] == 404


def test_element_count_limit_is_checked_before_allocating(served: Agent) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [10**9, 64], "data": []}]}
    code, err = served.request("POST", "/v2/models/mlp/infer", body)
    assert code == 400 and "over the limit" in err["error"] and "'input'" in err["error"]


def test_sockets_are_0660_and_owned_by_the_group(served: Agent) -> None:
    for name in ("nodecache.sock", "nodecache-grpc.sock"):
        info = (served.socket_dir / name).stat()
        assert oct(info.st_mode & 0o777) == oct(0o660)
        assert info.st_gid == os.getgid()


@pytest.mark.parametrize("binary", [False, True])
def test_sync_and_async_clients(served: Agent, mlp_dir: Path, binary: bool) -> None:
    x = np.random.default_rng(6).standard_normal((3, 64)).astype(np.float32)
    with SyncNodeClient(served.socket) as client:
        got = client.infer("mlp", {"input": x}, binary=binary)["output"]
        np.testing.assert_allclose(got, reference(mlp_dir, x), rtol=1e-5)
        assert client.get("/v2/models/mlp")["name"] == "mlp"
        with pytest.raises(ClientError) as err:
            client.infer("nope", {"input": x})
        assert err.value.status == 404

    async def go() -> np.ndarray:
        async with NodeClient(served.socket) as client:
            return (await client.infer("mlp", {"input": x}, binary=binary))["output"]

    np.testing.assert_allclose(asyncio.run(go()), reference(mlp_dir, x), rtol=1e-5)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_1000_connections_gets_503s_not_a_queue(served: Agent) -> None:
    assert served.proc is not None
    before = rss(served.proc.pid)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}

    async def flood() -> list[tuple[int, str | None]]:
        connector = aiohttp.UnixConnector(path=str(served.socket), limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> tuple[int, str | None]:
                async with session.post("http://x/v2/models/slow/infer", json=body) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("Retry-After")

            return await asyncio.gather(*(one() for _ in range(1000)))

    results = asyncio.run(flood())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 32  # the queue's worth was served
    assert codes.count(503) > 500  # the rest was told to come back, not queued
    assert all(retry for code, retry in results if code == 503)
    grown = rss(served.proc.pid) - before
    assert grown < 100 * 2**20, f"agent grew {grown / 2**20:.0f} MiB under the flood"
    assert served.request("POST", "/v2/models/slow/infer", body)[0] == 200


class CountingRuntime:
    platform = "counting"
    inputs = [TensorSpec("x", "FP32", (-1, 2))]
    outputs = [TensorSpec("y", "FP32", (-1, 2))]

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def predict(self, inputs, names):  # type: ignore[no-untyped-def]
        with self.lock:
            self.calls.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 10}

    def unload(self) -> None:
        pass


async def test_dynamic_batching_runs_concurrent_requests_as_one_call(tmp_path: Path) -> None:
    runtime = CountingRuntime()
    register_runtime("counting", lambda d, *, device, entrypoint: runtime)
    repo = ModelRepository([Device("cpu", 0, 1 << 30)])
    repo.register("m", tmp_path, "counting", batching=(8, 0.05), size_hint=0)
    dp = DataPlane(repo)
    await repo.load("m")

    async def ask(i: int, rows: int) -> np.ndarray:
        x = np.full((rows, 2), i, np.float32)
        return (await dp.infer("m", InferRequest(inputs={"x": x}))).outputs["y"]

    answers = await asyncio.gather(*(ask(i, 2) for i in range(4)))  # 8 rows: one full batch
    assert runtime.calls == [8]
    for i, y in enumerate(answers):
        np.testing.assert_array_equal(y, np.full((2, 2), i * 10, np.float32))
    runtime.calls.clear()
    lone = await ask(7, 1)  # alone: runs when the queue delay expires
    assert runtime.calls == [1] and lone.tolist() == [[70, 70]]


async def test_batcher_fails_every_request_of_a_bad_batch() -> None:
    async def wrong(inputs):  # type: ignore[no-untyped-def]
        return {"y": np.zeros(1)}  # one row for a batch of two

    batcher = Batcher(wrong, max_batch_size=2, max_queue_delay=1.0)
    results = await asyncio.gather(
        batcher.submit({"x": np.zeros((1, 2))}),
        batcher.submit({"x": np.zeros((1, 2))}),
        return_exceptions=True,
    )
    assert all(isinstance(r, ValueError) and "dynamic batching" in str(r) for r in results)


async def test_request_metrics_count_every_outcome(tmp_path: Path, mlp_dir: Path) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    repo = ModelRepository()
    repo.register("metered", mlp_dir, "onnx")
    dp = DataPlane(repo)
    good = InferRequest(inputs={"input": np.zeros((1, 64), np.float32)})
    bad = InferRequest(inputs={"input": np.zeros((1, 3), np.float32)})
    for request in (good, good, bad):
        with contextlib.suppress(ServeError):
            await dp.infer("metered", request, protocol="grpc")
    ok = {"model": "metered", "version": "1", "protocol": "grpc"}
    assert value("nodecache_requests_total", code="200", **ok) == 2
    assert value("nodecache_requests_total", code="400", **ok) == 1
    assert value("nodecache_request_duration_seconds_count", **ok) == 3
    assert value("nodecache_request_duration_seconds_bucket", le="+Inf", **ok) == 3
    assert 0 < value("nodecache_request_duration_seconds_sum", **ok) < 10
    assert value("nodecache_request_duration_seconds_bucket", le="10.0", **ok) == 3
    # Queue and inference time only for the requests that reached the model.
    assert value("nodecache_queue_duration_seconds_count", model="metered") == 2
    assert value("nodecache_inference_duration_seconds_count", model="metered") == 2
    assert value("nodecache_requests_in_flight", model="metered") == 0
