"""Co-located worker processes: routing, supervision, and weights shared between them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import Agent, declaration, free_port, wait_for

from nodecache.serve.devices import Device
from nodecache.serve.pool import worker_devices


def infer(agent: Agent, name: str, x: np.ndarray, timeout: float = 30) -> int:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    return agent.request("POST", f"/v2/models/{name}/infer", body)[0]


def workers(agent: Agent) -> list[dict]:
    return [d for d in agent.status()["devices"] if "worker" in d]


def test_models_spread_over_workers_and_answer(agent: Agent, mlp_dir: Path) -> None:
    port = free_port()
    agent.start("--workers", "2", "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    agent.declare("a.yaml", declaration("a", mlp_dir.as_uri(), size="1Mi"))
    agent.declare("b.yaml", declaration("b", mlp_dir.as_uri(), size="1Mi"))
    a, b = agent.wait_state("a", "Warm"), agent.wait_state("b", "Warm")
    assert {a["worker"], b["worker"]} == {0, 1}
    assert infer(agent, "a", np.ones((2, 64), np.float32)) == 200
    assert infer(agent, "b", np.ones((2, 64), np.float32)) == 200
    assert len(workers(agent)) == 2
    # Worker sockets are private to the agent: pods mount the socket folder, and a worker
    # reached directly would skip the node socket's checks.
    assert sorted(p.name for p in agent.socket_dir.iterdir()) == [
        "nodecache-grpc.sock",
        "nodecache.sock",
    ]
    code, err = agent.request("GET", "/v2/models/nope")
    assert code == 404 and "not found" in err["error"]
    # The workers' counts reach the agent's /metrics, each family exactly once.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    assert 'nodecache_requests_total{code="200",model="a",protocol="rest",version="1"} 1.0' in text
    assert text.count("# TYPE nodecache_requests_total counter") == 1


def test_grpc_reaches_models_in_workers(agent: Agent, mlp_dir: Path) -> None:
    import tritonclient.grpc as triton_grpc

    port = free_port()
    agent.start("--workers", "1", "--grpc-port", str(port))
    agent.declare("m.yaml", declaration("m", mlp_dir.as_uri()))
    agent.wait_state("m", "Warm")
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{port}")
    x = np.ones((2, 64), np.float32)
    inp = triton_grpc.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("m", [inp], request_id="w-1")
    assert result.as_numpy("output").shape == (2, 10)
    assert result.get_response().id == "w-1"
    http = agent.request(
        "POST",
        "/v2/models/m/infer",
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [2, 64], "data": x.ravel().tolist()}
            ]
        },
    )
    np.testing.assert_allclose(
        result.as_numpy("output").ravel(), http[1]["outputs"][0]["data"], rtol=1e-6
    )
    assert client.get_model_metadata("m").platform == "onnxruntime_onnx"
    with pytest.raises(Exception, match="not found"):
        client.infer("nope", [inp])


@contextlib.contextmanager
def traffic(agent: Agent, name: str) -> Iterator[list[int]]:
    """Four clients sending requests to the model until the block ends; yields the status
    codes as they come. On leaving, every client must stop within 30 s: none may hang."""
    codes: list[int] = []
    stop = threading.Event()

    def run() -> None:
        x = np.ones((1, 64), np.float32)
        while not stop.is_set():
            try:
                codes.append(infer(agent, name, x))
            except OSError:
                codes.append(-1)  # the node socket itself must never fail

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        yield codes
    finally:
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a client hung"


def test_killed_worker_gives_503s_not_hangs_and_comes_back(agent: Agent, mlp_dir: Path) -> None:
    agent.start("--workers", "1")
    agent.declare("m.yaml", declaration("m", mlp_dir.as_uri()))
    agent.wait_state("m", "Warm")
    (worker,) = workers(agent)
    with traffic(agent, "m") as codes:
        wait_for(lambda: len(codes) > 20, what="traffic")
        os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: workers(agent)[0]["pid"] != worker["pid"] and workers(agent)[0]["up"],
                 timeout=60, what="the worker restarted")  # fmt: skip
        agent.wait_state("m", "Warm", timeout=60)
        seen = len(codes)
        wait_for(lambda: len(codes) > seen + 20, what="traffic after the restart")
    assert set(codes) <= {200, 503}, set(codes)
    assert 503 in codes and codes[-1] == 200
    assert infer(agent, "m", np.ones((1, 64), np.float32)) == 200


def test_a_hot_model_gets_a_copy_on_another_worker(agent: Agent, mlp_dir: Path) -> None:
    agent.start("--workers", "2", "--spread-at", "1")
    agent.declare("m.yaml", declaration("m", mlp_dir.as_uri(), warm={"idleTimeout": "2s"}))
    home = agent.wait_state("m", "Warm")["worker"]
    with traffic(agent, "m") as codes:
        (copy,) = wait_for(lambda: agent.model("m").get("copies"), what="an extra copy")
        assert copy["worker"] != home and copy["device"] == "cpu"
        assert copy["attached"] is False  # CPU copies share weights through the page cache
        # Both copies answer: the copy takes part of the traffic.
        wait_for(lambda: agent.model("m")["copies"][0]["requests"] >= 20, what="the copy to answer")
        shown = subprocess.run(
            [sys.executable, "-m", "nodecache.agent.cli", "status",
             "--socket-dir", str(agent.socket_dir)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "cpu +cpu" in shown.splitlines()[1], shown
    assert set(codes) == {200}, set(codes)
    assert agent.model("m")["worker"] == home
    # A burst's copy goes once idle (here the model's own 2 s idle timeout applies).
    wait_for(lambda: "copies" not in agent.model("m"), timeout=30, what="the idle copy to go")
    assert infer(agent, "m", np.ones((1, 64), np.float32)) == 200


def resident(port: int, model: str) -> float:
    """The model's resident bytes summed over the workers, from the agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    prefix = f'nodecache_model_resident_bytes{{device="cpu",model="{model}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_removing_a_model_unloads_its_copies_too(agent: Agent, mlp_dir: Path) -> None:
    port = free_port()
    agent.start("--workers", "2", "--spread-at", "1", "--metrics-port", str(port),
                "--metrics-host", "127.0.0.1")  # fmt: skip
    agent.declare("m.yaml", declaration("m", mlp_dir.as_uri()))
    agent.wait_state("m", "Warm")
    one = wait_for(lambda: resident(port, "m"), what="the model's bytes in /metrics")
    with traffic(agent, "m") as codes:
        wait_for(lambda: agent.model("m").get("copies"), what="an extra copy")
    assert set(codes) == {200}
    assert resident(port, "m") == 2 * one  # held by both workers
    (agent.declarations / "m.yaml").unlink()
    wait_for(lambda: agent.model("m") is None, what="the model to go")
    # Both workers let go of it, the copy's included.
    wait_for(lambda: resident(port, "m") == 0, what="every copy to unload")
    assert agent.request("GET", "/v2/models/m")[0] == 404


def test_a_copy_whose_worker_dies_is_dropped_not_restored(agent: Agent, mlp_dir: Path) -> None:
    agent.start("--workers", "2", "--spread-at", "1")
    agent.declare("m.yaml", declaration("m", mlp_dir.as_uri()))
    home = agent.wait_state("m", "Warm")["worker"]
    with traffic(agent, "m") as codes:
        (copy,) = wait_for(lambda: agent.model("m").get("copies"), what="an extra copy")
        pid = next(w["pid"] for w in workers(agent) if w["worker"] == copy["worker"])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "copies" not in agent.model("m"), what="the dead copy to be dropped")
        seen = len(codes)
        # A little traffic, then quiet before the worker is back (0.5 s at least): a new
        # burst could rightly make a new copy there.
        wait_for(lambda: len(codes) > seen + 10, what="traffic after the kill")
    assert set(codes) <= {200, 503}, set(codes)
    assert codes[-1] == 200
    model = agent.model("m")
    assert model["worker"] == home and model["state"] == "Warm"
    wait_for(lambda: all(w["up"] for w in workers(agent)), timeout=60, what="the restart")
    # The restarted worker does not reload the copy: copies exist for bursts.
    assert "copies" not in agent.model("m")


BIG_PY = """
import torch


class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(75_000_000))

    def forward(self, x):
        return x * self.w.sum()  # touches every weight page
"""


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Pss")


@pytest.mark.slow
def test_two_workers_share_one_models_weights(agent: Agent, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "big.py").write_text(BIG_PY)
    save_file({"w": torch.ones(75_000_000)}, folder / "model.safetensors")
    size = (folder / "model.safetensors").stat().st_size  # 300 MB

    agent.start("--workers", "2", "--spread-at", "1")
    spec = {"format": "torch", "runtime": "python", "entrypoint": "big:Big"}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    agent.declare("one.yaml", declaration("one", folder.as_uri(), size="300Mi", **spec))
    first = agent.wait_state("one", "Warm", timeout=120)
    assert agent.request("POST", "/v2/models/one/infer", body)[0] == 200
    # The other worker imports torch with a tiny model first: measure weights, not libtorch.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "big.py").write_text(BIG_PY.replace("75_000_000", "8"))
    save_file({"w": torch.ones(8)}, tiny / "model.safetensors")
    agent.declare("tiny.yaml", declaration("tiny", tiny.as_uri(), size="1Ki", **spec))
    assert agent.wait_state("tiny", "Warm", timeout=120)["worker"] != first["worker"]
    assert agent.request("POST", "/v2/models/tiny/infer", body)[0] == 200
    pids = [w["pid"] for w in workers(agent)]
    before = sum(pss(p) for p in pids)

    # Concurrent requests make the model hot: the other worker gets a copy of it.
    results: list[int] = []
    clients = [
        threading.Thread(
            target=lambda: results.extend(
                agent.request("POST", "/v2/models/one/infer", body)[0] for _ in range(20)
            )
        )
        for _ in range(3)
    ]
    for t in clients:
        t.start()
    (copy,) = wait_for(lambda: agent.model("one").get("copies"), timeout=60, what="a copy")
    for t in clients:
        t.join(60)
    assert copy["worker"] != first["worker"] and set(results) == {200}
    wait_for(lambda: agent.model("one")["copies"][0]["requests"] > 0, what="the copy to answer")
    after = sum(pss(p) for p in pids)
    growth = after - before
    print(f"second copy added {growth / size:.1%} of the model ({growth} bytes)")
    assert growth < 0.10 * size, f"the second copy added {growth / size:.0%} of the model"


def test_worker_devices_split_budgets() -> None:
    cpu = Device("cpu", 100, 80)
    assert [(d.name, d.budget) for d in worker_devices([cpu], None)] == [("cpu", 80)]
    assert [d.budget for d in worker_devices([cpu], 4)] == [20, 20, 20, 20]
    gpus = [Device("cuda:0", 100, 90), Device("cuda:1", 100, 90), cpu]
    assert [d.name for d in worker_devices(gpus, None)] == ["cuda:0", "cuda:1"]
    three = worker_devices(gpus, 3)
    assert [(d.name, d.budget) for d in three] == [("cuda:0", 45), ("cuda:1", 90), ("cuda:0", 45)]
