"""The runtime interface: what a runtime is (``Runtime``), what it reports (``TensorSpec``)
and how it fails (``UnsupportedFormat``). It imports no runtime, so the runtimes in
``serve/runtimes/``, the custom-model SDK (``serve.model``) and the registry
(``runtimes.registry``) all depend on it without a cycle.

A runtime is small on purpose (metadata, ``predict``, ``unload``); everything about
the protocol, concurrency and residency lives outside it. ``predict`` blocks and is
always called from a worker thread, never on the event loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["Loader", "Runtime", "TensorSpec", "UnsupportedFormat", "read_ahead"]


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


class Loader(Protocol):
    def __call__(self, model_dir: Path, *, device: str, entrypoint: str | None) -> Runtime: ...


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
