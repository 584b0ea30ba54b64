"""Small real models built in code: for the demo, the tests and the benchmarks.

Needs the ``onnx`` package (the ``dev`` extra); serving them needs only onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_all_types_onnx", "write_mlp_onnx"]


def write_mlp_onnx(
    path: Path, *, inputs: int = 64, hidden: int = 32, outputs: int = 10, seed: int = 0
) -> Path:
    """A two-layer MLP, FP32 [batch, inputs] -> [batch, outputs], with fixed random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((inputs, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, outputs)).astype(np.float32)
    b2 = rng.standard_normal(outputs).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "w2", "b2"], ["output"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    return _save(onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


# OIP datatype -> ONNX element type, for every type numpy and onnxruntime both hold.
_IDENTITY_TYPES = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FP16": "FLOAT16",
    "FP32": "FLOAT",
    "FP64": "DOUBLE",
    "BYTES": "STRING",
}


def write_all_types_onnx(path: Path) -> Path:
    """Identity for every OIP datatype: input ``in_<TYPE>`` [-1, 2] -> output ``out_<TYPE>``."""
    import onnx
    from onnx import TensorProto, helper

    nodes, ins, outs = [], [], []
    for oip, onnx_type in _IDENTITY_TYPES.items():
        elem = getattr(TensorProto, onnx_type)
        nodes.append(helper.make_node("Identity", [f"in_{oip}"], [f"out_{oip}"]))
        ins.append(helper.make_tensor_value_info(f"in_{oip}", elem, ["n", 2]))
        outs.append(helper.make_tensor_value_info(f"out_{oip}", elem, ["n", 2]))
    graph = helper.make_graph(nodes, "identity_all_types", ins, outs)
    return _save(onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _save(onnx, model, path: Path) -> Path:  # type: ignore[no-untyped-def]
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
