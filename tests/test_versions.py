"""Model versions on one node (issue 16), end to end on a real agent, in-process and with
workers: weighted choice, pinned versions, a rollout under load, shadow traffic.

Each version is a python model whose output is its input times its version number, so
an answer shows which version computed it, whatever its ``model_version`` says."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from support import Agent, declaration, free_port, wait_for

from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc

MODEL_PY = """
import json
import numpy as np
from nodecache.serve import Model
from nodecache.serve.runtimes import TensorSpec


class Versioned(Model):
    inputs = [TensorSpec("x", "FP32", (-1,))]
    outputs = [TensorSpec("y", "FP32", (-1,))]

    def load(self):
        self.factor = np.float32(json.loads((self.model_dir / "factor.json").read_text()))

    def predict(self, inputs):
        return {"y": inputs["x"] * self.factor}
"""
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
Z_999 = 3.29  # two-sided 99.9% normal quantile


def model(root: Path, factor: float, tag: str = "") -> Path:
    folder = root / f"model-{factor}{tag}"
    folder.mkdir(exist_ok=True)
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "factor.json").write_text(json.dumps(factor))
    return folder


def version(
    agent: Agent, name: str, folder: Path, number: str, traffic: int, mirror: int = 0
) -> None:
    serving = {"name": "fraud", "version": number, "traffic": traffic, "mirror": mirror}
    agent.declare(
        f"{name}.yaml",
        declaration(name, folder.as_uri(), size="1Mi", runtime="python",
                    entrypoint="model:Versioned", serving=serving),
    )  # fmt: skip


def answer(agent: Agent, path: str = "/v2/models/fraud/infer") -> tuple[str, float]:
    code, doc = agent.request("POST", path, BODY)
    assert code == 200, doc
    assert doc["model_name"] == "fraud"
    return doc["model_version"], doc["outputs"][0]["data"][0]


def start(agent: Agent, workers: int) -> int:
    metrics = free_port()
    agent.start("--workers", str(workers), "--metrics-port", str(metrics),
                "--metrics-host", "127.0.0.1")  # fmt: skip
    return metrics


def sample(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("workers", [0, 2])
def test_weights_split_unpinned_requests_and_pins_reach_their_version(
    agent: Agent, tmp_path: Path, workers: int
) -> None:
    start(agent, workers)
    weights = {"1": 50, "2": 30, "3": 20, "4": 0}
    for number, traffic in weights.items():
        version(agent, f"fraud-v{number}", model(tmp_path, int(number)), number, traffic)
    for number in weights:
        agent.wait_state(f"fraud-v{number}", "Warm")

    seen = Counter()
    for _ in range(2000):
        got, y = answer(agent)
        assert y == float(got)  # the answer's version is the one that computed it
        seen[got] += 1
    total = sum(weights.values())
    for number, traffic in weights.items():
        p = traffic / total
        spread = Z_999 * math.sqrt(2000 * p * (1 - p))
        assert abs(seen[number] - 2000 * p) <= spread, (number, seen)
    assert seen["4"] == 0

    for number in weights:  # pinned, traffic 0 included: REST, V1, metadata, readiness
        assert answer(agent, f"/v2/models/fraud/versions/{number}/infer") == (number, int(number))
        code, doc = agent.request(
            "POST", f"/v1/models/fraud/versions/{number}:predict", {"instances": [1.0]}
        )
        assert (code, doc) == (200, {"predictions": [float(number)]})
        code, meta = agent.request("GET", f"/v2/models/fraud/versions/{number}")
        assert code == 200 and meta["name"] == "fraud" and meta["versions"] == list(weights)
        assert agent.request("GET", f"/v2/models/fraud/versions/{number}/ready")[0] == 200
    code, doc = agent.request("POST", "/v1/models/fraud:predict", {"instances": [1.0]})
    assert code == 200 and doc["predictions"][0] in (1.0, 2.0, 3.0)
    code, meta = agent.request("GET", "/v2/models/fraud")
    assert code == 200 and meta["versions"] == ["1", "2", "3", "4"] and meta["platform"] == "python"
    code, err = agent.request("POST", "/v2/models/fraud/versions/9/infer", BODY)
    assert code == 404 and "version '9' not found" in err["error"]
    code, err = agent.request("POST", "/v2/models/fraud-v1/infer", BODY)
    assert code == 404  # a declaration's own name is not a served name when serving names one
    for bad in ("v" * 65, "a%20b", "a%2Fb"):  # not a version: refused, never a path
        code, err = agent.request("POST", f"/v2/models/fraud/versions/{bad}/infer", BODY)
        assert code == 400 and "is not 1 to 64" in err["error"], (bad, err)
    code, index = agent.request("POST", "/v2/repository/index", {})
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("fraud", n, "READY") for n in weights
    ]
    entry = agent.model("fraud-v2")
    assert entry and entry["serving"] == {
        "name": "fraud",
        "version": "2",
        "traffic": 30,
        "mirror": 0,
    }

    async def grpc_pinned() -> list[tuple[str, float]]:
        socket = agent.socket_dir / "nodecache-grpc.sock"
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answers = []
            for number in weights:
                reply = await stub.ModelInfer(grpc_request(number))
                answers.append((reply.model_version, _grpc_y(reply)))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.ModelInfer(grpc_request("9"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.ModelInfer(grpc_request("../2"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return answers

    assert asyncio.run(grpc_pinned()) == [(n, float(n)) for n in weights]


def grpc_request(number: str | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fraud", model_version=number or "")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.ones(1, np.float32).tobytes())
    return request


def _grpc_y(reply: pb.ModelInferResponse) -> float:
    assert reply.model_name == "fraud"
    return float(np.frombuffer(reply.raw_output_contents[0], np.float32)[0])


class Load:
    """Requests without a version, REST and gRPC, from a thread until ``stop``: each
    outcome as (protocol, error or None, model_version, output)."""

    def __init__(self, agent: Agent, clients: int = 3) -> None:
        self.agent, self.clients = agent, clients
        self.outcomes: list[tuple[str, str | None, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def last(self, n: int) -> list[tuple[str, str | None, str, float]]:
        return self.outcomes[-n:]

    async def _run(self) -> None:
        connector = aiohttp.UnixConnector(path=str(self.agent.socket))
        grpc_socket = self.agent.socket_dir / "nodecache-grpc.sock"
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            grpc.aio.insecure_channel(f"unix:{grpc_socket}") as channel,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(
                *(self._rest(session) for _ in range(self.clients)),
                *(self._grpc(stub) for _ in range(self.clients)),
            )

    async def _rest(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            async with session.post("http://node/v2/models/fraud/infer", json=BODY) as resp:
                doc: dict[str, Any] = await resp.json()
            if resp.status != 200:
                self.outcomes.append(("rest", f"{resp.status} {doc}", "", 0.0))
            else:
                y = doc["outputs"][0]["data"][0]
                self.outcomes.append(("rest", None, doc["model_version"], y))

    async def _grpc(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        while not self._stop.is_set():
            try:
                reply = await stub.ModelInfer(grpc_request())
            except grpc.aio.AioRpcError as exc:
                self.outcomes.append(("grpc", f"{exc.code()} {exc.details()}", "", 0.0))
            else:
                self.outcomes.append(("grpc", None, reply.model_version, _grpc_y(reply)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_rollout_under_load_fails_no_request(agent: Agent, tmp_path: Path, workers: int) -> None:
    start(agent, workers)
    old, new = model(tmp_path, 1), model(tmp_path, 2)
    version(agent, "fraud-v1", old, "1", 90)
    version(agent, "fraud-v2", new, "2", 10)
    agent.wait_state("fraud-v1", "Warm")
    agent.wait_state("fraud-v2", "Warm")
    with Load(agent) as load:
        wait_for(lambda: {o[2] for o in load.outcomes} >= {"1", "2"}, what="both versions")
        version(agent, "fraud-v1", old, "1", 0)
        version(agent, "fraud-v2", new, "2", 100)
        # Within a second or two every unpinned request goes to the new version.
        wait_for(lambda: len(load.last(60)) == 60 and {o[2] for o in load.last(60)} == {"2"},
                 timeout=10, what="all traffic on version 2")  # fmt: skip
        (agent.declarations / "fraud-v1.yaml").unlink()
        wait_for(lambda: agent.model("fraud-v1") is None, what="version 1 drained and gone")
        served = len(load.outcomes)
        wait_for(lambda: len(load.outcomes) > served + 50, what="requests after the removal")
    failed = [o for o in load.outcomes if o[1] is not None]
    assert failed == [], failed[:5]
    assert all(float(o[2]) == o[3] for o in load.outcomes)
    assert {o[0] for o in load.outcomes} == {"rest", "grpc"}
    code, meta = agent.request("GET", "/v2/models/fraud")
    assert code == 200 and meta["versions"] == ["2"]


@pytest.mark.parametrize("workers", [0, 2])
def test_mirrors_get_copies_compared_never_answers(
    agent: Agent, tmp_path: Path, workers: int
) -> None:
    port = start(agent, workers)
    version(agent, "primary", model(tmp_path, 1), "1", 100)
    version(agent, "same", model(tmp_path, 1, "-copy"), "1b", 0, mirror=50)
    version(agent, "other", model(tmp_path, 2), "2", 0, mirror=50)
    for name in ("primary", "same", "other"):
        agent.wait_state(name, "Warm")
    for _ in range(400):
        assert answer(agent) == ("1", 1.0)  # the caller only ever sees the primary

    def copies(name: str, number: str) -> float:
        labels = {"model": name, "version": number}
        return sample(port, "nodecache_mirror_requests_total", **labels) + sample(
            port, "nodecache_mirror_dropped_total", **labels
        )

    for name, number in (("same", "1b"), ("other", "2")):
        # Binomial(400, 0.5): 200 give or take 4 standard deviations (10 each).
        wait_for(lambda n=name, v=number: copies(n, v) >= 160, what=f"{name}'s copies")
        assert 160 <= copies(name, number) <= 240
    other = {"model": "other", "version": "2"}
    assert (
        sample(port, "nodecache_mirror_divergent_total", **other)
        == sample(port, "nodecache_mirror_requests_total", **other)
        > 0
    )
    assert sample(port, "nodecache_mirror_divergent_total", model="same", version="1b") == 0
    # V1 requests are mirrored too (Binomial(100, 0.5) more copies: 50 give or take 20).
    before = copies("other", "2")
    for _ in range(100):
        code, doc = agent.request("POST", "/v1/models/fraud:predict", {"instances": [1.0]})
        assert (code, doc) == (200, {"predictions": [1.0]})
    wait_for(lambda: copies("other", "2") >= before + 30, what="V1 copies")
    assert copies("other", "2") <= before + 70
    # The mirrors' own runs are counted apart from the callers' requests.
    mirrored = {"model": "other", "version": "2", "protocol": "mirror", "code": "200"}
    assert sample(port, "nodecache_requests_total", **mirrored) > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_serving_edit_reroutes_without_a_reload(
    agent: Agent, tmp_path: Path, workers: int
) -> None:
    start(agent, workers)
    folder = model(tmp_path, 1)
    version(agent, "fraud-v1", folder, "1", 100)
    agent.wait_state("fraud-v1", "Warm")
    assert answer(agent) == ("1", 1.0)
    version(agent, "fraud-v1", folder, "1.0.1", 100)  # the same files, renamed
    wait_for(lambda: answer(agent)[0] == "1.0.1", timeout=10, what="the new version name")
    assert answer(agent, "/v2/models/fraud/versions/1.0.1/infer") == ("1.0.1", 1.0)
    code, _ = agent.request("POST", "/v2/models/fraud/versions/1/infer", BODY)
    assert code == 404
    entry = agent.model("fraud-v1")
    assert entry is not None and entry["loads"] == 1  # neither fetched nor loaded again
