"""GPU paths: run where CUDA is present (marked ``gpu``), skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve.dataplane import DataPlane
from serve.devices import discover_devices
from serve.protocol import InferRequest
from serve.repository import ModelRepository

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

    from serve.runtimes.staging import load_staged

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
