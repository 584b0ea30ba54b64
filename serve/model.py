"""``serve.Model``: the base class for custom Python models, shaped like ``kserve.Model``.

A model source opts in with ``runtime: python`` and ``entrypoint: module:Class``; the
class is imported from the model folder, so only sources you trust should do this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nodecache.serve.runtime import TensorSpec

__all__ = ["Model"]


class Model:
    """Override ``load`` and ``predict``; ``preprocess``/``postprocess`` are optional.

    ``inputs``/``outputs`` describe the tensors for the metadata endpoint; when left
    empty, requests are not checked against them.
    """

    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.device = device

    def load(self) -> None:
        """Read weights from ``self.model_dir``; called once, in a worker thread."""

    def preprocess(self, inputs: dict[str, np.ndarray]) -> Any:
        return inputs

    def predict(self, data: Any) -> Any:
        raise NotImplementedError

    def postprocess(self, result: Any) -> dict[str, np.ndarray]:
        return result

    def unload(self) -> None:
        """Release what ``load`` took (files, device memory)."""
