"""ONNX models through onnxruntime (CPU provider here; CUDA when onnxruntime-gpu is installed).

Large models load mapped, not copied. onnxruntime copies inline initializers out of the
protobuf and, by default, repacks MatMul weights into private buffers: ~400 ms for 200 MB,
paid again on every load and by every worker. With the weights in an external data file
and prepacking off, onnxruntime maps the file instead: the session is ready in a few
milliseconds and every worker shares the same page-cache pages. So a model of at least
``MAPPED_MIN_BYTES`` with inline weights is converted once into a derived copy with
external data (beside the model, in the cache's ``DERIVED_DIR``), and sessions of such
models are created with ``session.disable_prepacking``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from nodecache.cache import DERIVED_DIR, model_files
from nodecache.serve.errors import InvalidInput, clean_message
from nodecache.serve.runtime import TensorSpec, UnsupportedFormat, read_ahead

__all__ = ["MAPPED_MIN_BYTES", "OnnxRuntime", "mapped_copy"]

log = logging.getLogger(__name__)

MAPPED_MIN_BYTES = 32 << 20
"""Models with at least this many bytes of files load mapped (external data, no
prepacking). Below it, loading is fast anyway and prepacked weights are kept."""
_WEIGHTS_NAME = "weights.bin"
_SOURCE_STAMP = "source.json"

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


# What session.run raises when the model (loaded fine) fails on the values it was given;
# anything else (a provider or CUDA failure, EPFail) is ours and answers 500.
_INPUT_FAULTS = (
    ort_errors.InvalidArgument,
    ort_errors.Fail,
    ort_errors.RuntimeException,
)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise UnsupportedFormat(f"tensor '{arg.name}' has type {arg.type}, which OIP cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def find_onnx_file(model_dir: Path) -> Path:
    """The one .onnx file of a model folder (``model.onnx`` if there are several)."""
    candidates = model_files(model_dir, "*.onnx")
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
        self._output_names = [s.name for s in self.outputs]
        self.resident_bytes: int | None = None

    @classmethod
    def from_dir(cls, model_dir: Path, *, device: str = "cpu") -> OnnxRuntime:
        path = find_onnx_file(model_dir)
        options = ort.SessionOptions()
        # Many models share the node's cores: keep each session's pool small and
        # let concurrency come from parallel requests instead of spinning threads.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        if _files_bytes(path.parent) >= MAPPED_MIN_BYTES:
            path = mapped_copy(path)
            options.add_session_config_entry("session.disable_prepacking", "1")
            read_ahead(p for p in path.parent.iterdir() if p.is_file() and p != path)
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = device.partition(":")[2] or "0"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise UnsupportedFormat(f"onnxruntime cannot load {path.name}: {exc}") from exc
        runtime = cls(session)
        # Copied into the session or mapped from the page cache, the file's bytes (with
        # any external data beside it) are what the model holds.
        runtime.resident_bytes = _files_bytes(path.parent)
        return runtime

    def predict(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None
    ) -> dict[str, np.ndarray]:
        feed = (
            {
                name: (_as_str(name, array) if name in self._string_inputs else array)
                for name, array in inputs.items()
            }
            if self._string_inputs
            else inputs
        )
        names = output_names or self._output_names
        try:
            results = self._session.run(names, feed)
        except _INPUT_FAULTS as exc:
            # Inputs of the declared types and ranks that the graph still cannot take: an
            # index out of range, shapes that do not broadcast, a negative or huge shape.
            raise InvalidInput(
                f"the model cannot run on this input: {clean_message(str(exc))}"
            ) from None
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


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def mapped_copy(path: Path) -> Path:
    """The model at ``path`` with every initializer in one external data file: ``path``
    itself when it has no large inline weights, else a derived copy, built on first use.

    Workers may race to build it: each writes a private folder and renames it into
    place; the first rename wins. Any failure (read-only or full disk, a model onnx
    cannot parse) leaves the original to load the slow way, with a warning.
    """
    info = path.stat()
    if info.st_size < MAPPED_MIN_BYTES:
        return path  # the weights are already external (or the model is small)
    stamp = {"name": path.name, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    home = path.parent / DERIVED_DIR
    target = home / f"onnx-{path.stem}"
    try:
        built = json.loads((target / _SOURCE_STAMP).read_text())
        if {k: built.get(k) for k in stamp} == stamp:
            return target / path.name if built.get("copied") else path
    except (OSError, ValueError, AttributeError):
        pass
    try:
        home.mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=home))
        work.chmod(0o755)  # as readable as the model folder it is derived from
    except OSError as exc:
        log.warning("loading %s unmapped: cannot write beside it (%s)", path, exc)
        return path
    try:
        copied = _convert(path, work / path.name)  # False: remembered, not retried
        (work / _SOURCE_STAMP).write_text(json.dumps({**stamp, "copied": copied}))
        for name in (path.name, _WEIGHTS_NAME) if copied else ():
            with open(work / name, "rb") as f:
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
        shutil.rmtree(target, ignore_errors=True)  # a stale copy of an older file
        try:
            os.rename(work, target)
        except OSError:
            if not (target / _SOURCE_STAMP).exists():  # not a lost race: a real failure
                raise
        if not copied:
            return path
        log.info("wrote a mapped copy of %s (external data) for fast loads", path)
        return target / path.name
    except Exception as exc:
        log.warning("loading %s unmapped: could not write a mapped copy (%s)", path, exc)
        return path
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert(src: Path, dest: Path) -> bool:
    """Write ``src`` with its inline initializers moved into one external data file."""
    import onnx  # only needed to build a copy, once per model
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    if any(uses_external_data(t) for t in model.graph.initializer):
        return False  # partly external already: its data files stay where it points
    onnx.save_model(
        model,
        str(dest),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=_WEIGHTS_NAME,
        size_threshold=1024,
    )
    return True
