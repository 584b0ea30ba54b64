"""How GPU weights travel between workers (CUDA IPC handles as JSON), checked on the CPU.

The handles themselves need a GPU (tests/test_gpu.py); what is tested here is that the
encoding keeps every field a CUDA tensor's reduction has, and refuses anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nodecache.serve.runtimes.ipc import NotShareable, _decode, _encode, encode_weights  # noqa: E402
from nodecache.serve.runtimes.torch import TorchRuntime  # noqa: E402


def test_a_cuda_reduction_survives_json_field_for_field() -> None:
    # The shape of torch.multiprocessing.reductions.rebuild_cuda_tensor's arguments.
    args = (torch.nn.Parameter, torch.Size([2, 3]), (3, 1), 4, torch.storage.TypedStorage,
            torch.bfloat16, 0, b"\x00\xffhandle", 4096, 512, False, b"/torch_ref", 7,
            b"\x01event", True)  # fmt: skip
    sent = json.loads(json.dumps([_encode(a) for a in args]))
    back = tuple(_decode(a) for a in sent)
    assert back == tuple(tuple(a) if isinstance(a, tuple) else a for a in args)
    assert back[0] is torch.nn.Parameter and back[5] is torch.bfloat16


@pytest.mark.parametrize(
    "field",
    [{"class": "Popen"}, {"dtype": "object"}, {"module": "os"}],
)
def test_anything_but_tensor_fields_is_refused(field: dict) -> None:
    with pytest.raises(NotShareable):
        _decode(field)


def test_an_unexpected_class_is_never_encoded() -> None:
    with pytest.raises(NotShareable, match="unexpected class"):
        _encode(dict)


def test_cpu_weights_are_not_shared_by_handle(tmp_path: Path) -> None:
    """On the CPU the page cache shares the weights; there are no handles to export."""
    with pytest.raises(NotShareable, match="not a CUDA device"):
        encode_weights({"w": torch.ones(3)})
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.empty(3))\n"
        "    def forward(self, x):\n"
        "        return x * self.w\n"
    )
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    runtime = TorchRuntime.from_dir(tmp_path, device="cpu", entrypoint="net:Net")
    with pytest.raises(NotShareable):
        runtime.export_weights()
    with pytest.raises(NotShareable, match="this worker uses cpu"):
        TorchRuntime.attach(
            tmp_path, device="cpu", entrypoint="net:Net",
            weights={"device": "cuda:0", "tensors": {}},
        )  # fmt: skip
