"""Model runtimes: what turns files on disk into something that answers ``predict``.

A runtime is small on purpose (metadata, ``predict``, ``unload``); everything about
the protocol, concurrency and residency lives outside it. ``predict`` blocks and is
always called from a worker thread, never on the event loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "FORMATS",
    "Runtime",
    "TensorSpec",
    "UnsupportedFormat",
    "attach_runtime",
    "detect_format",
    "device_kinds",
    "load_runtime",
    "read_ahead",
    "register_runtime",
]


class UnsupportedFormat(ValueError):
    """The model's format is unknown, ambiguous, or has no runtime on this node."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the OIP metadata endpoint reports it; -1 is a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Runtime(Protocol):
    """A loaded model. It may also have ``resident_bytes`` (int): what it holds in memory;
    without it the repository measures the process's growth during the load."""

    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None
    ) -> dict[str, np.ndarray]: ...

    def unload(self) -> None: ...


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


class Loader(Protocol):
    def __call__(self, model_dir: Path, *, device: str, entrypoint: str | None) -> Runtime: ...


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


def read_ahead(paths: Iterable[Path]) -> None:
    """Start reading weight files into the page cache at disk speed, in the background.

    Mapped weights are otherwise read by page faults as the first forward pass reaches
    each layer: compute and disk then take turns, and a cold load runs below the disk's
    rate. ``POSIX_FADV_WILLNEED`` queues the whole file at once; on a warm cache it only
    walks pages already there. Advice only: errors are ignored.
    """
    files = list(paths)

    def advise() -> None:
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    if files and hasattr(os, "posix_fadvise"):
        threading.Thread(target=advise, name="read-ahead", daemon=True).start()
