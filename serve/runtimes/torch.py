"""PyTorch models: torch.export programs (.pt2), TorchScript (.pt), or a module class
whose weights come from safetensors (zero-copy, memory-mapped on CPU).

``torch.load`` is only ever called with ``weights_only=True``: a checkpoint can never
run code. A module class comes from the model source and therefore needs the
declaration's ``runtime: python`` opt-in, like any other code.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodecache.serve.errors import InvalidInput, clean_message
from nodecache.serve.runtime import TensorSpec, UnsupportedFormat, read_ahead

__all__ = ["TorchRuntime"]

_DATATYPES = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}


def _one(model_dir: Path, pattern: str) -> Path | None:
    found = sorted(model_dir.rglob(pattern))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UnsupportedFormat(f"several {pattern} files ({names}); keep one per model")
    return found[0] if found else None


def _state_dict(model_dir: Path, device: str) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.rglob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        from nodecache.serve.runtimes.staging import load_staged

        read_ahead(files)
        state: dict[str, torch.Tensor] = {}
        for path in files:  # sharded checkpoints: model-00001-of-00002.safetensors, ...
            if device == "cpu":  # mapped: zero copies, pages shared with other workers
                state.update(load_file(path, device=device))
            else:  # through pinned buffers, reads overlapped with the copies to the GPU
                state.update(load_staged(path, device))
        return state
    checkpoint = _one(model_dir, "*.pt") or _one(model_dir, "*.pth") or _one(model_dir, "*.bin")
    if checkpoint is None:
        raise UnsupportedFormat("no weights: expected *.safetensors (or a .pt/.pth state dict)")
    state = torch.load(checkpoint, map_location=device, weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise UnsupportedFormat(f"{checkpoint.name} is not a state dict")
    return state


def _spec(name: str, value: Any) -> TensorSpec:
    if isinstance(value, torch.Tensor):
        return TensorSpec(name, _DATATYPES.get(value.dtype, "FP32"), tuple(value.shape))
    return TensorSpec(name, "FP32", (-1,))


class TorchRuntime:
    platform = "pytorch"

    def __init__(
        self,
        call: Any,
        input_names: list[str],
        device: str,
        *,
        inputs: list[TensorSpec] | None = None,
        resident_bytes: int | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._call = call
        self._input_names = input_names
        self._device = torch.device(device)
        # Without example inputs a module does not say its shapes: requests are then
        # checked by the module itself.
        self.inputs = inputs or []
        self.outputs: list[TensorSpec] = []
        self.resident_bytes = resident_bytes
        # A module class's weights by name: what another worker on the device may attach to.
        self._weights = weights

    @classmethod
    def from_dir(cls, model_dir: Path, *, device: str, entrypoint: str | None) -> TorchRuntime:
        if entrypoint:
            return cls._from_module_class(model_dir, device, entrypoint)
        exported = _one(model_dir, "*.pt2")
        if exported is not None:
            return cls._from_export(exported, device)
        scripted = _one(model_dir, "*.pt")
        if scripted is not None:
            return cls._from_torchscript(scripted, device)
        raise UnsupportedFormat(
            "a torch model needs a .pt2 (torch.export), a .pt (TorchScript), or "
            "safetensors weights with spec.entrypoint naming the module class"
        )

    @classmethod
    def attach(
        cls, model_dir: Path, *, device: str, entrypoint: str | None, weights: dict[str, Any]
    ) -> TorchRuntime:
        """The model over weights another worker on ``device`` exported (CUDA IPC): no
        read, no copy, and no device memory of its own for them."""
        from nodecache.serve.runtimes.ipc import decode_weights

        if not entrypoint:
            raise UnsupportedFormat("only a module class with safetensors weights can attach")
        return cls._from_module_class(
            model_dir, device, entrypoint, state=decode_weights(weights, device)
        )

    def export_weights(self) -> dict[str, Any]:
        """CUDA IPC handles of this model's weights, for another worker on the device."""
        from nodecache.serve.runtimes.ipc import NotShareable, encode_weights

        if self._weights is None:
            raise NotShareable("only a module class with safetensors weights can be shared")
        return encode_weights(self._weights)

    @classmethod
    def _from_module_class(
        cls,
        model_dir: Path,
        device: str,
        entrypoint: str,
        state: dict[str, torch.Tensor] | None = None,
    ) -> TorchRuntime:
        from nodecache.serve.runtimes.python import import_entrypoint

        module_cls = import_entrypoint(model_dir, entrypoint)
        if not (isinstance(module_cls, type) and issubclass(module_cls, torch.nn.Module)):
            raise UnsupportedFormat(f"entrypoint {entrypoint} is not a torch.nn.Module subclass")
        with torch.device("meta"):
            module = module_cls()  # no memory until the real weights are assigned
        attached = state is not None
        if state is None:
            state = _state_dict(model_dir, device)
        try:
            module.load_state_dict(state, assign=True, strict=True)
        except RuntimeError as exc:
            raise UnsupportedFormat(f"weights do not match {entrypoint}: {exc}") from None
        module.eval()
        names = [p for p in inspect.signature(module.forward).parameters if p != "self"]
        # Attached weights belong to the exporting worker: they take nothing more here.
        size = 0 if attached else sum(t.numel() * t.element_size() for t in state.values())
        return cls(module, names, device, resident_bytes=size, weights=state)

    @classmethod
    def _from_torchscript(cls, path: Path, device: str) -> TorchRuntime:
        try:
            module = torch.jit.load(str(path), map_location=device)
        except RuntimeError as exc:
            raise UnsupportedFormat(
                f"{path.name} is not TorchScript ({exc.__class__.__name__}); for a state "
                "dict, name the module class with spec.entrypoint"
            ) from None
        module.eval()
        names = [a.name for a in module.forward.schema.arguments if a.name != "self"]
        return cls(module, names, device, resident_bytes=_module_bytes(module))

    @classmethod
    def _from_export(cls, path: Path, device: str) -> TorchRuntime:
        program = torch.export.load(str(path))
        user_inputs = list(program.graph_signature.user_inputs)
        placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        specs = [_spec(name, placeholders[name].meta.get("val")) for name in user_inputs]
        module = program.module()
        if device != "cpu":
            module = module.to(device)
        return cls(module, user_inputs, device, inputs=specs, resident_bytes=_module_bytes(module))

    def predict(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None
    ) -> dict[str, np.ndarray]:
        args = []
        for name in self._input_names:
            if name not in inputs:
                raise InvalidInput(
                    f"input '{name}' is missing; the model takes {self._input_names}"
                )
            args.append(torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self._device))
        try:
            with torch.inference_mode():
                result = self._call(*args)
        except torch.OutOfMemoryError:
            raise  # ours: the device is full, whatever was asked
        except (RuntimeError, IndexError, ValueError, AssertionError) as exc:
            # Inputs of the declared types the module cannot take: shapes that do not
            # multiply, an index past an embedding, a failed export guard.
            raise InvalidInput(f"the model cannot run on this input: {_message(exc)}") from None
        outputs = _name_outputs(result)
        if output_names:
            outputs = {n: outputs[n] for n in output_names if n in outputs}
        return outputs

    def unload(self) -> None:
        self._call = self._weights = None


def _message(exc: BaseException) -> str:
    """The error without TorchScript's traceback (source lines and their paths): its
    last line is the error itself."""
    text = str(exc).strip()
    if "Traceback of TorchScript" in text:
        text = text.splitlines()[-1]
    return clean_message(text)


def _module_bytes(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _to_numpy(value: Any) -> np.ndarray:
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


def _name_outputs(result: Any) -> dict[str, np.ndarray]:
    """One tensor -> "output"; a tuple/list -> "output_0", ...; a dict keeps its keys."""
    if isinstance(result, torch.Tensor):
        return {"output": _to_numpy(result)}
    if isinstance(result, dict):
        return {str(k): _to_numpy(v) for k, v in result.items()}
    if isinstance(result, (tuple, list)):
        return {f"output_{i}": _to_numpy(v) for i, v in enumerate(result)}
    raise TypeError(f"the model returned {type(result).__name__}, not tensors")
