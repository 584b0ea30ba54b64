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
