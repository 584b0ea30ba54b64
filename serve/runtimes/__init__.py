"""Model runtimes: what turns files on disk into something that answers ``predict``.

``nodecache.serve.runtime`` is the interface a runtime implements (outside this package,
so the custom-model SDK ``serve.model`` can use it while ``python`` here uses the SDK),
``registry`` maps formats to runtimes; ``onnx``, ``torch`` and ``python`` are the built-in
ones. This package re-exports the interface and the registry.
"""

from __future__ import annotations

from nodecache.serve.runtime import (
    Loader,
    Runtime,
    TensorSpec,
    UnsupportedFormat,
    read_ahead,
)
from nodecache.serve.runtimes.registry import (
    FORMATS,
    attach_runtime,
    detect_format,
    device_kinds,
    load_runtime,
    register_runtime,
)

__all__ = [
    "FORMATS",
    "Loader",
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
