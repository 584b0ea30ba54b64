"""ONNX models through onnxruntime (CPU provider here; CUDA when onnxruntime-gpu is installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.errors import InvalidInput
from serve.runtimes import TensorSpec, UnsupportedFormat

__all__ = ["OnnxRuntime"]

# onnxruntime type strings -> OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise UnsupportedFormat(f"tensor '{arg.name}' has type {arg.type}, which OIP cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def find_onnx_file(model_dir: Path) -> Path:
    """The one .onnx file of a model folder (``model.onnx`` if there are several)."""
    candidates = sorted(p for p in model_dir.rglob("*.onnx") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    preferred = model_dir / "model.onnx"
    if preferred in candidates:
        return preferred
    if not candidates:
        raise UnsupportedFormat(f"no .onnx file in {model_dir}")
    names = ", ".join(str(p.relative_to(model_dir)) for p in candidates)
    raise UnsupportedFormat(f"several .onnx files ({names}) and none is model.onnx")


class OnnxRuntime:
    platform = "onnxruntime_onnx"

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        self._string_inputs = {s.name for s in self.inputs if s.datatype == "BYTES"}
        self.resident_bytes: int | None = None

    @classmethod
    def from_dir(cls, model_dir: Path, *, device: str = "cpu") -> OnnxRuntime:
        path = find_onnx_file(model_dir)
        options = ort.SessionOptions()
        # Many models share the node's cores: keep each session's pool small and
        # let concurrency come from parallel requests instead of spinning threads.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = device.partition(":")[2] or "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise UnsupportedFormat(f"onnxruntime cannot load {path.name}: {exc}") from exc
        runtime = cls(session)
        # Initializers are copied out of the file into the session: the file's bytes
        # (with any external data beside it) are what the model holds.
        runtime.resident_bytes = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
        return runtime

    def predict(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None
    ) -> dict[str, np.ndarray]:
        feed = {
            name: (_as_str(name, array) if name in self._string_inputs else array)
            for name, array in inputs.items()
        }
        names = output_names or [s.name for s in self.outputs]
        results = self._session.run(names, feed)
        return dict(zip(names, results, strict=True))

    def unload(self) -> None:
        self._session = None  # type: ignore[assignment]


def _as_str(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors want str objects; OIP BYTES arrive as bytes."""
    try:
        flat = [x.decode() if isinstance(x, bytes) else str(x) for x in array.ravel()]
    except UnicodeDecodeError:
        raise InvalidInput(
            f"input '{name}' holds bytes that are not UTF-8; this ONNX model takes text"
        ) from None
    return np.array(flat, dtype=object).reshape(array.shape)
