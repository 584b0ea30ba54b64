"""Which runtime loads which format, and onto which kinds of device: the registry.

The built-in runtimes are imported only when a model of their format loads (onnxruntime and
torch are heavy); tests add fake runtimes with ``register_runtime``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from nodecache.serve.runtime import Loader, Runtime, UnsupportedFormat

__all__ = [
    "FORMATS",
    "attach_runtime",
    "detect_format",
    "device_kinds",
    "load_runtime",
    "register_runtime",
]

# File suffix -> format; the first format whose suffix appears among the files wins.
_SUFFIXES: dict[str, str] = {
    ".onnx": "onnx",
    ".safetensors": "torch",
    ".pt": "torch",
    ".pt2": "torch",
}
FORMATS = ("onnx", "torch", "python")


def detect_format(files: Iterable[str]) -> str:
    """Guess the format from file names, as a KServe user who wrote no ``format`` expects."""
    found = {_SUFFIXES[s] for f in files if (s := Path(f).suffix.lower()) in _SUFFIXES}
    if len(found) == 1:
        return found.pop()
    if not found:
        raise UnsupportedFormat(
            "cannot tell the model format from its files (no .onnx, .safetensors, .pt or .pt2); "
            "set spec.format"
        )
    raise UnsupportedFormat(
        f"files look like several formats ({', '.join(sorted(found))}); set spec.format"
    )


@dataclass(frozen=True)
class _RuntimeKind:
    load: Loader
    # Device kinds ("cpu", "cuda") this runtime can use on this machine.
    device_kinds: Callable[[], frozenset[str]]


def _load_onnx(model_dir: Path, *, device: str, entrypoint: str | None) -> Runtime:
    from nodecache.serve.runtimes.onnx import OnnxRuntime

    return OnnxRuntime.from_dir(model_dir, device=device)


def _onnx_devices() -> frozenset[str]:
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return frozenset({"cpu", "cuda"} if cuda else {"cpu"})


def _load_python(model_dir: Path, *, device: str, entrypoint: str | None) -> Runtime:
    from nodecache.serve.runtimes.python import PythonRuntime

    return PythonRuntime.from_dir(model_dir, device=device, entrypoint=entrypoint)


def _load_torch(model_dir: Path, *, device: str, entrypoint: str | None) -> Runtime:
    try:
        from nodecache.serve.runtimes.torch import TorchRuntime
    except ImportError:
        raise UnsupportedFormat("PyTorch is not installed here; install nodecache[torch]") from None
    return TorchRuntime.from_dir(model_dir, device=device, entrypoint=entrypoint)


def _torch_devices() -> frozenset[str]:
    try:
        import torch
    except ImportError:
        return frozenset({"cpu"})
    return frozenset({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})


_RUNTIMES: dict[str, _RuntimeKind] = {
    "torch": _RuntimeKind(_load_torch, _torch_devices),
    "onnx": _RuntimeKind(_load_onnx, _onnx_devices),
    "python": _RuntimeKind(_load_python, lambda: frozenset({"cpu", "cuda"})),
}


def register_runtime(
    fmt: str, load: Loader, device_kinds: Callable[[], frozenset[str]] = lambda: frozenset({"cpu"})
) -> None:
    """Add (or replace) the runtime for a format; tests use it for fake runtimes."""
    _RUNTIMES[fmt] = _RuntimeKind(load, device_kinds)


def _kind(fmt: str) -> _RuntimeKind:
    try:
        return _RUNTIMES[fmt]
    except KeyError:
        raise UnsupportedFormat(
            f"no runtime for format '{fmt}' in this build; available: {', '.join(_RUNTIMES)}"
        ) from None


def device_kinds(fmt: str) -> frozenset[str]:
    """Which kinds of device a model of this format can be loaded onto here."""
    return _kind(fmt).device_kinds()


def load_runtime(
    fmt: str, model_dir: Path, *, device: str = "cpu", entrypoint: str | None = None
) -> Runtime:
    """Load the model in ``model_dir`` onto ``device`` (blocking; call from a thread)."""
    return _kind(fmt).load(model_dir, device=device, entrypoint=entrypoint)


def attach_runtime(
    fmt: str, model_dir: Path, *, device: str, entrypoint: str | None, weights: dict[str, object]
) -> Runtime:
    """The model built over weights another worker on ``device`` exported (blocking).

    Only torch module classes export weights (CUDA IPC handles); see ``runtimes.ipc``."""
    if fmt != "torch":
        raise UnsupportedFormat(f"a {fmt} model cannot attach to another worker's weights")
    from nodecache.serve.runtimes.torch import TorchRuntime

    return TorchRuntime.attach(model_dir, device=device, entrypoint=entrypoint, weights=weights)
