"""PyTorch models: module class + safetensors, TorchScript, torch.export; never unsafe pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402
from support import Agent, declaration  # noqa: E402

from nodecache.serve.dataplane import DataPlane  # noqa: E402
from nodecache.serve.protocol import InferRequest  # noqa: E402
from nodecache.serve.repository import ModelRepository  # noqa: E402
from nodecache.serve.runtimes import detect_format  # noqa: E402

NET_PY = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
"""


def reference_net(folder: Path) -> torch.nn.Module:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(NET_PY)
    namespace: dict = {}
    exec(NET_PY, namespace)
    torch.manual_seed(0)
    return namespace["Net"]().eval()


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


async def infer(repo: ModelRepository, name: str, x: np.ndarray) -> np.ndarray:
    response = await DataPlane(repo).infer(name, InferRequest(inputs={"x": x}))
    return response.outputs["output"]


async def test_module_class_with_safetensors(tmp_path: Path, x: np.ndarray) -> None:
    net = reference_net(tmp_path / "m")
    save_file(net.state_dict(), tmp_path / "m" / "model.safetensors")
    repo = ModelRepository()
    repo.register("m", tmp_path / "m", "torch", entrypoint="net:Net")
    got = await infer(repo, "m", x)
    np.testing.assert_allclose(got, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5)
    model = repo.get("m")
    assert model.measured_bytes == sum(p.numel() * 4 for p in net.parameters())


# TorchScript is deprecated upstream but still what many checkpoints are; it stays served.
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
async def test_torchscript(tmp_path: Path, x: np.ndarray) -> None:
    net = reference_net(tmp_path / "src")
    folder = tmp_path / "ts"
    folder.mkdir()
    torch.jit.trace(net, torch.from_numpy(x)).save(str(folder / "model.pt"))
    assert detect_format(["model.pt"]) == "torch"
    repo = ModelRepository()
    repo.register("ts", folder, "torch")
    got = await infer(repo, "ts", x)
    np.testing.assert_allclose(got, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5)


async def test_torch_export_program_reports_its_inputs(tmp_path: Path, x: np.ndarray) -> None:
    net = reference_net(tmp_path / "src")
    folder = tmp_path / "ex"
    folder.mkdir()
    program = torch.export.export(net, (torch.from_numpy(x),))
    torch.export.save(program, str(folder / "model.pt2"))
    repo = ModelRepository()
    repo.register("ex", folder, "torch")
    got = await infer(repo, "ex", x)
    np.testing.assert_allclose(got, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5)
    meta = await DataPlane(repo).model_metadata("ex")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [4, 8]}]


class Exploit:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


async def test_pickled_checkpoints_cannot_run_code(tmp_path: Path) -> None:
    reference_net(tmp_path / "m")
    torch.save({"fc1.weight": Exploit()}, tmp_path / "m" / "model.pt")
    repo = ModelRepository()
    repo.register("m", tmp_path / "m", "torch", entrypoint="net:Net")
    with pytest.raises(Exception, match=r"Weights only load failed"):
        await repo.load("m")
    assert repo.get("m").state == "Error"


async def test_weights_that_do_not_match_the_class(tmp_path: Path) -> None:
    reference_net(tmp_path / "m")
    save_file({"fc1.weight": torch.zeros(2, 2)}, tmp_path / "m" / "model.safetensors")
    repo = ModelRepository()
    repo.register("m", tmp_path / "m", "torch", entrypoint="net:Net")
    with pytest.raises(Exception, match="weights do not match net:Net"):
        await repo.load("m")


def test_agent_serves_a_torch_module_class(agent: Agent, tmp_path: Path, x: np.ndarray) -> None:
    net = reference_net(tmp_path / "m")
    save_file(net.state_dict(), tmp_path / "m" / "model.safetensors")
    agent.start()
    decl = declaration(
        "net", (tmp_path / "m").as_uri(), format="torch", runtime="python", entrypoint="net:Net"
    )
    agent.declare("net.yaml", decl)
    agent.wait_state("net", "Warm", timeout=60)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, 8],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    code, answer = agent.request("POST", "/v2/models/net/infer", body)
    assert code == 200, answer
    expected = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(4, 3), expected,
                               rtol=1e-5)  # fmt: skip


def test_staged_loading_streams_every_tensor_exactly(tmp_path: Path) -> None:
    """The GPU loader's chunking (pinned buffers on a GPU), checked on the CPU: tensors
    larger than a buffer, many in one buffer, every dtype, scalars and empty tensors."""
    from safetensors.torch import load_file, save_file

    from nodecache.serve.runtimes.staging import load_staged

    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(3000, generator=g),  # 12,000 bytes: spans four 4 KiB chunks
        "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "half": torch.randn(33, generator=g).half(),
        "i64": torch.arange(-5, 6, dtype=torch.int64),
        "u8": torch.arange(0, 250, dtype=torch.uint8),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(state, path)

    loaded = load_staged(path, "cpu", chunk_bytes=4096)

    expected = load_file(path)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def test_staged_loading_refuses_a_truncated_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from nodecache.serve.runtimes.staging import load_staged

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(ValueError, match=r"wrong data offsets|file ended"):
        load_staged(path, "cpu", chunk_bytes=1024)
