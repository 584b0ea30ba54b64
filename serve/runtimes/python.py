"""Custom Python models: a ``serve.Model`` subclass imported from the model folder."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from nodecache.serve.errors import InvalidInput
from nodecache.serve.model import Model
from nodecache.serve.runtime import UnsupportedFormat

__all__ = ["PythonRuntime"]


def _import(model_dir: Path, module: str) -> ModuleType:
    path = model_dir.joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        raise UnsupportedFormat(f"entrypoint module '{module}' not found: no {path.name} in model")
    # A name unique per folder: two models may both ship a "model.py".
    unique = f"_nodecache_{hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]}_{module}"
    spec = importlib.util.spec_from_file_location(unique, path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(model_dir))  # sibling imports inside the model folder
    try:
        spec.loader.exec_module(loaded)
    except Exception as exc:
        raise UnsupportedFormat(
            f"importing {path.name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        sys.path.remove(str(model_dir))
    return loaded


def import_entrypoint(model_dir: Path, entrypoint: str) -> object:
    """The object ``module:Name`` from the model folder (only ever with the opt-in)."""
    module_name, _, attr = entrypoint.partition(":")
    found = getattr(_import(model_dir, module_name), attr, None)
    if found is None:
        raise UnsupportedFormat(f"entrypoint {entrypoint}: no '{attr}' in {module_name}")
    return found


class PythonRuntime:
    platform = "python"

    def __init__(self, model: Model) -> None:
        self.model = model
        self.inputs = list(model.inputs)
        self.outputs = list(model.outputs)

    @classmethod
    def from_dir(cls, model_dir: Path, *, device: str, entrypoint: str | None) -> PythonRuntime:
        if not entrypoint:
            raise UnsupportedFormat("a python model needs spec.entrypoint: module:Class")
        cls_obj = import_entrypoint(model_dir, entrypoint)
        if not (isinstance(cls_obj, type) and issubclass(cls_obj, Model)):
            raise UnsupportedFormat(f"entrypoint {entrypoint} is not a serve.Model subclass")
        model = cls_obj(model_dir, device)
        model.load()
        return cls(model)

    def predict(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None
    ) -> dict[str, np.ndarray]:
        result = self.model.postprocess(self.model.predict(self.model.preprocess(inputs)))
        if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
            raise TypeError(
                f"{type(self.model).__name__}.postprocess must return a dict of name -> array"
            )
        outputs = {k: np.asarray(v) for k, v in result.items()}
        if output_names:
            missing = [n for n in output_names if n not in outputs]
            if missing:
                raise InvalidInput(f"unknown output '{missing[0]}'")
            outputs = {n: outputs[n] for n in output_names}
        return outputs

    def unload(self) -> None:
        self.model.unload()
