"""GPU weights shared between the workers of one device through CUDA IPC.

A worker that holds a model warm on ``cuda:N`` exports its tensors as CUDA IPC handles;
another worker on the same device opens them and builds its module over the *same* device
memory: the weights are on the GPU once, however many workers answer for the model.

The handles travel as JSON between our own processes (through the agent), never pickle:
the decoder rebuilds only tensors, with the few types ``torch.multiprocessing`` itself
puts in a CUDA tensor's reduction. PyTorch's IPC reference counting keeps the exporter's
blocks allocated until every importer has let go; the exporter process must stay alive
while they are in use, which is why the pool drops importing copies when the exporter
unloads the model or dies.

Known limit: every export counts one importer per tensor. Handles that are exported and
never imported (the importing worker dies between the two) keep those blocks reserved in
the exporter until it exits, whatever its budget says. The pool exports right before the
load that imports, so only a worker dying in that window leaks.
"""

from __future__ import annotations

import base64
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

__all__ = ["NotShareable", "decode_weights", "encode_weights"]


class NotShareable(ValueError):
    """The tensors are not on a CUDA device, so there is nothing to share by handle."""


# The classes a CUDA tensor's reduction names; nothing else is ever rebuilt.
_CLASSES: dict[str, type] = {
    "Tensor": torch.Tensor,
    "Parameter": torch.nn.Parameter,
    "TypedStorage": torch.storage.TypedStorage,
    "UntypedStorage": torch.UntypedStorage,
}
_DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, type):
        name = value.__name__
        if _CLASSES.get(name) is not value:
            raise NotShareable(f"unexpected class {value!r} in a CUDA tensor's reduction")
        return {"class": name}
    if isinstance(value, (tuple, list)):  # torch.Size included
        return {"tuple": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NotShareable(f"cannot send a {type(value).__name__} between workers")


def _decode(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if "bytes" in value:
        return base64.b64decode(value["bytes"])
    if "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    for key, known in (("dtype", _DTYPES), ("class", _CLASSES)):
        if key in value:
            if value[key] not in known:
                raise NotShareable(f"unknown {key} {value[key]!r} in shared weights")
            return known[value[key]]
    raise NotShareable(f"not an encoded tensor field: {value!r}")


def encode_weights(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """IPC handles for every tensor, as JSON; raises NotShareable unless all are on CUDA."""
    encoded: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            raise NotShareable(f"tensor {name!r} is on {tensor.device}, not a CUDA device")
        rebuild, args = reduce_tensor(tensor.detach())
        if rebuild is not rebuild_cuda_tensor:
            raise NotShareable(f"tensor {name!r} has no CUDA IPC form")
        encoded[name] = [_encode(a) for a in args]
    return {"device": _device_of(tensors), "tensors": encoded}


def decode_weights(doc: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    """Open the handles another worker exported; they must be for ``device``."""
    if doc.get("device") != device:
        raise NotShareable(f"weights are on {doc.get('device')}, this worker uses {device}")
    return {
        name: rebuild_cuda_tensor(*(_decode(a) for a in args))
        for name, args in doc["tensors"].items()
    }


def _device_of(tensors: dict[str, torch.Tensor]) -> str | None:
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise NotShareable(f"tensors are spread over {sorted(devices)}")
    return devices.pop() if devices else None
