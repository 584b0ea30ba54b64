"""Checking a request against the model's declared tensors: names, datatypes, ranks and
fixed dimensions of its inputs, and the outputs it asks for (400 with what the model takes).

The dataplane prepares these once per load (``TensorChecks``), so each request is checked
with dict lookups, whatever its transport.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from nodecache.serve.errors import InvalidInput, excerpt
from nodecache.serve.metrics import INFERENCE_SECONDS, QUEUE_SECONDS, child
from nodecache.serve.protocol import InferRequest
from nodecache.serve.runtime import TensorSpec
from nodecache.serve.tensors import DATATYPES, datatype_of
from nodecache.serve.triton.config import has_batch_dimension

__all__ = ["TensorChecks"]


class TensorChecks:
    """A model's declared tensors, prepared once per load so each request is checked with
    dict lookups; also the model's queue and inference metrics."""

    def __init__(self, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs, self.outputs = inputs, outputs
        # name -> (datatype, numpy dtype, rank, (index, size) of each fixed dimension)
        self.expected = {
            s.name: (
                s.datatype,
                DATATYPES[s.datatype],
                len(s.shape),
                tuple((i, d) for i, d in enumerate(s.shape) if d != -1),
            )
            for s in inputs
        }
        self.output_names = {s.name for s in outputs}
        self.batched = has_batch_dimension(inputs, outputs)
        self.queue_seconds = child(QUEUE_SECONDS, name)
        self.inference_seconds = child(INFERENCE_SECONDS, name)

    def rows(self, inputs: dict[str, np.ndarray]) -> int:
        """Inferences one call with these inputs makes: its batch rows, if batched (Triton's
        ``inference_count``)."""
        if not self.batched or not inputs:
            return 1
        first = next(iter(inputs.values()))
        return first.shape[0] if first.ndim else 1

    def check_inputs(self, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = self.expected
        if not expected:  # a custom model that describes no inputs takes what it is given
            return given
        if len(given) != len(expected) or not expected.keys() >= given.keys():
            _refuse_names(self.inputs, given)
        for name, array in given.items():
            datatype, dtype, rank, fixed = expected[name]
            # Arrays decoded from the wire carry the table's dtypes; anything else (another
            # byte order, say) is compared by OIP datatype.
            if array.dtype != dtype:
                _check_datatype(name, array, datatype)
            shape = array.shape
            if len(shape) != rank:
                _refuse_shape(name, shape, self.inputs)
            for i, size in fixed:
                if shape[i] != size:
                    _refuse_shape(name, shape, self.inputs)
        return given

    def check_outputs(self, request: InferRequest) -> dict[str, bool]:
        """Requested outputs -> binary flag."""
        assert request.outputs is not None
        if not self.outputs:
            return {out.name: out.binary for out in request.outputs}
        wanted: dict[str, bool] = {}
        for out in request.outputs:
            if out.name not in self.output_names:
                raise InvalidInput(
                    f"unknown output {excerpt(out.name)}; the model has "
                    f"{', '.join(sorted(self.output_names))}"
                )
            wanted[out.name] = out.binary
        return wanted


def _refuse_names(specs: list[TensorSpec], given: dict[str, np.ndarray]) -> NoReturn:
    """Raise for the first unknown input, else the first missing one."""
    expected = [s.name for s in specs]
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise InvalidInput(
            f"unknown input {excerpt(unknown[0])}; "
            f"the model takes {', '.join(expected) or 'no inputs'}"
        )
    missing = [n for n in expected if n not in given]
    raise InvalidInput(f"input '{missing[0]}' is missing")


def _refuse_shape(name: str, shape: tuple[int, ...], specs: list[TensorSpec]) -> NoReturn:
    spec = next(s for s in specs if s.name == name)
    raise InvalidInput(
        f"input '{name}' has shape {list(shape)}, "
        f"the model expects {list(spec.shape)} (-1 is any size)"
    )


def _check_datatype(name: str, array: np.ndarray, wanted: str) -> None:
    datatype = "BYTES" if array.dtype == DATATYPES["BYTES"] else datatype_of(array)
    if datatype != wanted:
        raise InvalidInput(f"input '{name}' has datatype {datatype}, the model expects {wanted}")
