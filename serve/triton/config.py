"""Triton's model configuration extension: what ``GET /v2/models/{m}/config`` and gRPC
``ModelConfig`` answer, written as Triton prints a ``model_config.proto`` in JSON.

Triton's tools read it before anything else (perf_analyzer aborts without it): the
platform, the batch limit and each tensor's ``TYPE_*`` and dims. It is derived from what
the runtime reports (the same tensors as the metadata) and how the node serves the model
(dynamic batching, concurrency, device); nothing here is read from a ``config.pbtxt``.
"""

from __future__ import annotations

from math import prod
from typing import Any

from nodecache.serve.protocol import DEFAULT_MAX_ELEMENTS
from nodecache.serve.runtime import TensorSpec

__all__ = ["has_batch_dimension", "model_config", "version_policy"]

# OIP datatype -> Triton's DataType name (BYTES is TYPE_STRING there).
_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}
# The runtime's platform -> Triton's (platform, backend) for the same kind of model.
_PLATFORMS = {
    "onnxruntime_onnx": ("onnxruntime_onnx", "onnxruntime"),
    "pytorch": ("pytorch_libtorch", "pytorch"),
    "python": ("", "python"),
}
_INT32_MAX = 2**31 - 1


def has_batch_dimension(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> bool:
    """Whether requests carry a batch, Triton-style: the model takes inputs and every one
    of its tensors' first dimension is free."""
    return bool(inputs) and all(t.shape[:1] == (-1,) for t in [*inputs, *outputs])


def _batch_limit(inputs: list[TensorSpec], batching: tuple[int, float] | None) -> int:
    """The most rows one request may carry: the dynamic batcher's batch size when the node
    batches the model, else as many rows of the largest input as the element limit lets
    through (a free dimension counted as 1)."""
    if batching is not None:
        return batching[0]
    row = max((prod(abs(d) for d in t.shape[1:]) for t in inputs), default=1)
    return max(1, min(_INT32_MAX, DEFAULT_MAX_ELEMENTS // max(row, 1)))


def version_policy(versions: list[str]) -> dict[str, Any]:
    """The versions served, as Triton's policy names them (integers: Triton's versions
    are numbers; a version of other characters has no place there)."""
    return {"specific": {"versions": sorted(int(v) for v in versions if v.isdigit())}}


def model_config(
    name: str,
    *,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    versions: list[str],
    batching: tuple[int, float] | None,
    device_kind: str,
    device_index: int,
    concurrency: int,
) -> dict[str, Any]:
    """The model's configuration as Triton prints it (JSON field names of model_config.proto,
    integers as numbers)."""
    triton_platform, backend = _PLATFORMS.get(platform, ("", platform))
    batched = has_batch_dimension(inputs, outputs)
    strip = 1 if batched else 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {
            "name": spec.name,
            "data_type": _TYPES[spec.datatype],
            "dims": list(spec.shape[strip:]),
        }

    gpu = device_kind == "cuda"
    config: dict[str, Any] = {
        "name": name,
        "platform": triton_platform,
        "backend": backend,
        "version_policy": version_policy(versions),
        "max_batch_size": _batch_limit(inputs, batching) if batched else 0,
        "input": [
            {
                **tensor(s),
                "format": "FORMAT_NONE",
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for s in inputs
        ],
        "output": [{**tensor(s), "label_filename": "", "is_shape_tensor": False} for s in outputs],
        "instance_group": [
            {
                "name": f"{name}_0",
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": concurrency,
                "gpus": [device_index] if gpu else [],
                "passive": False,
            }
        ],
        "model_transaction_policy": {"decoupled": False},
        "response_cache": {"enable": False},
    }
    if batched and batching is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": [batching[0]],
            "max_queue_delay_microseconds": round(batching[1] * 1_000_000),
        }
    return config
