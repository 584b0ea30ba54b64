"""GPU paths: run where CUDA is present (marked ``gpu``), skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.devices import discover_devices
from nodecache.serve.protocol import InferRequest
from nodecache.serve.repository import ModelRepository

pytestmark = pytest.mark.gpu

NET_PY = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x)
"""


def test_nvml_finds_the_gpus_with_their_memory() -> None:
    gpus = [d for d in discover_devices(cpu_budget=1 << 30) if d.kind == "cuda"]
    assert gpus and all(d.total > 0 and 0 < d.budget <= d.total for d in gpus)


async def test_torch_model_warms_on_the_gpu(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "net.py").write_text(NET_PY)
    namespace: dict = {}
    exec(NET_PY, namespace)
    net = namespace["Net"]().eval()
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    devices = discover_devices(cpu_budget=1 << 30)
    repo = ModelRepository(devices)
    repo.register("net", tmp_path, "torch", entrypoint="net:Net")
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    answer = await DataPlane(repo).infer("net", InferRequest(inputs={"x": x}))
    assert repo.get("net").device.name.startswith("cuda")
    expected = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(answer.outputs["output"], expected, rtol=1e-4, atol=1e-5)
    assert repo.get("net").measured_bytes == sum(p.numel() * 4 for p in net.parameters())


def test_staged_load_puts_every_tensor_on_the_gpu_exactly(tmp_path: Path) -> None:
    """Pinned double-buffered staging (several chunks in flight) gives the same tensors
    as safetensors' own loader, on the GPU."""
    import torch
    from safetensors.torch import load_file, save_file

    from nodecache.serve.runtimes.staging import load_staged

    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(1 << 18, generator=g) for i in range(12)}  # 12 MiB
    state["bf16"] = torch.randn(1000, 3, generator=g).to(torch.bfloat16)
    state["scalar"] = torch.tensor(2, dtype=torch.int64)
    path = tmp_path / "model.safetensors"
    save_file(state, path)

    loaded = load_staged(path, "cuda:0", chunk_bytes=1 << 20)

    expected = load_file(path, device="cuda:0")
    for name, tensor in expected.items():
        assert loaded[name].device.type == "cuda", name
        assert torch.equal(loaded[name], tensor), name


CHILD = """
import json, sys
import torch
from nodecache.serve.runtimes.torch import TorchRuntime

runtime = TorchRuntime.attach(
    __import__("pathlib").Path(sys.argv[1]), device="cuda:0", entrypoint="net:Net",
    weights=json.loads(sys.stdin.read()),
)
out = runtime.predict({"x": __import__("numpy").ones((1, 8), "float32")}, None)["output"]
print(json.dumps({"bias": runtime._weights["fc.bias"].tolist(), "out": out.tolist(),
                  "resident": runtime.resident_bytes}))
"""


def test_another_process_attaches_to_the_same_gpu_memory(tmp_path: Path) -> None:
    """CUDA IPC: the importing process sees the exporter's memory itself, not a copy."""
    import json
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from nodecache.serve.runtimes.torch import TorchRuntime

    (tmp_path / "net.py").write_text(NET_PY)
    namespace: dict = {}
    exec(NET_PY, namespace)
    save_file(namespace["Net"]().state_dict(), tmp_path / "model.safetensors")
    owner = TorchRuntime.from_dir(tmp_path, device="cuda:0", entrypoint="net:Net")
    weights = owner.export_weights()
    # Written after the export: only the very same memory can show it.
    with torch.no_grad():
        owner._weights["fc.bias"].fill_(7.0)
    torch.cuda.synchronize()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], input=json.dumps(weights),
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen["bias"] == [7.0, 7.0, 7.0] and seen["resident"] == 0
    expected = owner.predict({"x": np.ones((1, 8), np.float32)}, None)["output"]
    np.testing.assert_allclose(seen["out"], expected, rtol=1e-5)


BIG_PY = """
import torch


class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(SIZE))

    def forward(self, x):
        return x * self.w.sum()
"""


def test_workers_on_one_gpu_hold_a_hot_model_once(tmp_path: Path) -> None:
    """Two workers on cuda:0; a hot model's second copy attaches to the first's weights:
    the GPU's used memory grows by well under the model's size."""
    import threading

    import pynvml
    import torch
    from safetensors.torch import save_file
    from support import Agent, declaration, wait_for

    size = 128 << 20  # floats: 512 MiB
    folder, tiny = tmp_path / "big", tmp_path / "tiny"
    for path, n in ((folder, size), (tiny, 8)):
        path.mkdir()
        (path / "big.py").write_text(BIG_PY.replace("SIZE", str(n)))
        save_file({"w": torch.ones(n)}, path / "model.safetensors")
    spec = {"format": "torch", "runtime": "python", "entrypoint": "big:Big"}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}

    def used() -> int:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
        finally:
            pynvml.nvmlShutdown()

    agent = Agent(tmp_path / "agent")
    agent.start("--workers", "2", "--spread-at", "1")
    try:
        agent.declare("one.yaml", declaration("one", folder.as_uri(), size="600Mi", **spec))
        first = agent.wait_state("one", "Warm", timeout=300)
        assert first["device"] == "cuda:0"
        # The other worker makes its CUDA context first: measure weights, not contexts.
        agent.declare("tiny.yaml", declaration("tiny", tiny.as_uri(), size="1Ki", **spec))
        assert agent.wait_state("tiny", "Warm", timeout=300)["worker"] != first["worker"]
        assert agent.request("POST", "/v2/models/tiny/infer", body)[0] == 200
        before = used()
        results: list[int] = []

        def client() -> None:
            for _ in range(50):
                results.append(agent.request("POST", "/v2/models/one/infer", body)[0])

        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        (copy,) = wait_for(lambda: agent.model("one").get("copies"), 120, "a copy")
        for t in clients:
            t.join(120)
        assert copy["attached"] is True and copy["device"] == "cuda:0"
        assert set(results) == {200}
        wait_for(lambda: agent.model("one")["copies"][0]["requests"] > 0, what="copy answers")
        growth = used() - before
        print(f"the attached copy added {growth / (size * 4):.1%} of the model to cuda:0")
        assert growth < 0.10 * size * 4
    finally:
        agent.stop()
