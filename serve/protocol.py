"""Inference requests and responses of the Open Inference Protocol v2, apart from the wire.

``decode_request`` and ``encode_response`` handle the REST body: JSON, optionally
followed by raw tensor bytes (the binary tensor data extension, framed by the
``Inference-Header-Content-Length`` header).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

import numpy as np
import orjson

from nodecache.serve.errors import InvalidInput, excerpt
from nodecache.serve.tensors import decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "HEADER_LENGTH",
    "OFFLOAD_BYTES",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "SharedRef",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "shared_ref",
    "sized_work",
    "tensor_bytes",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
# Elements one tensor may claim: refuses a [10**12] shape before any allocation.
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024
# Output tensor bytes one answer may carry (binary size), as much as a request body may.
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
# Bodies and answers above this many bytes are parsed or encoded in a thread: below it the
# work takes well under a millisecond, above it it would stall every other client.
OFFLOAD_BYTES = 1 << 20

T = TypeVar("T")


async def sized_work(size: int, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)``: on the event loop for ``size`` up to ``OFFLOAD_BYTES``,
    in a thread above it (decoding or encoding a large body holds the loop for seconds)."""
    if size <= OFFLOAD_BYTES:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)


def tensor_bytes(tensors: dict[str, np.ndarray]) -> int:
    """What ``tensors`` hold in memory: cheap, a measure of the work to decode, run or
    encode them (8 bytes per element of a BYTES tensor)."""
    return sum(array.nbytes for array in tensors.values())


@dataclass(frozen=True)
class SharedRef:
    """A tensor in a registered shared memory region (Triton's system shared memory
    extension): the region's name and the part of it; for an input, its datatype and
    shape as the request gave them (checked when the bytes are read)."""

    region: str
    byte_size: int
    offset: int = 0
    datatype: Any = None
    shape: Any = None


def shared_ref(params: dict[str, Any], what: str) -> SharedRef | None:
    """The shared memory part of a tensor's parameters, if it names a region."""
    region = params.get("shared_memory_region")
    if region is None:
        return None
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if not isinstance(region, str) or any(type(n) is not int or n < 0 for n in (size, offset)):
        raise InvalidInput(
            f"{what}: shared_memory_region must be a string, shared_memory_byte_size and "
            "shared_memory_offset non-negative integers"
        )
    return SharedRef(region, size, offset)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    shm: SharedRef | None = None


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # None: every output of the model.
    outputs: list[RequestedOutput] | None = None
    binary_outputs: bool = False
    # Inputs whose bytes are in shared memory, by name: read where the model runs.
    shared: dict[str, SharedRef] = field(default_factory=dict)
    # The caller's shared memory regions by name (serve/triton/shm.py), when it uses any.
    regions: Callable[[str], Any] | None = None

    @property
    def uses_shared_memory(self) -> bool:
        return bool(self.shared) or any(o.shm for o in self.outputs or ())


@dataclass
class InferResponse:
    model_name: str
    model_version: str | None
    outputs: dict[str, np.ndarray]
    id: str | None = None
    binary: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    # Outputs already written to shared memory: only their name, datatype and shape go back.
    placed: dict[str, dict[str, Any]] = field(default_factory=dict)


_NO_PARAMETERS: dict[str, Any] = {}


def _parameters(obj: dict[str, Any], what: str) -> dict[str, Any]:
    """``obj``'s parameters; ``what`` names it ("input", "output") when they are not an object."""
    params = obj.get("parameters")
    if params is None:
        return _NO_PARAMETERS if "parameters" not in obj else _refuse_parameters(obj, what)
    if type(params) is not dict:
        _refuse_parameters(obj, what)
    return params


def _refuse_parameters(obj: dict[str, Any], what: str) -> NoReturn:
    where = "request" if what == "request" else f"{what} {excerpt(str(obj.get('name')))}"
    raise InvalidInput(f"{where}: 'parameters' must be an object")


def decode_request(
    body: bytes, header_length: int | None = None, *, max_elements: int | None = None
) -> InferRequest:
    """Parse a REST infer body; ``header_length`` is the JSON part's size when binary follows."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = orjson.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")

    inputs: dict[str, np.ndarray] = {}
    shared: dict[str, SharedRef] = {}
    offset = 0
    for spec in raw_inputs:
        raw = None
        if type(spec) is dict and "parameters" in spec:
            ref = shared_ref(_parameters(spec, "input"), f"input {excerpt(str(spec.get('name')))}")
            if ref is not None and type(spec.get("name")) is str:
                if spec["name"] in shared:
                    raise InvalidInput(f"input {excerpt(spec['name'])} is given twice")
                shared[spec["name"]] = replace(ref, datatype=spec.get("datatype"),
                                               shape=spec.get("shape"))  # fmt: skip
                continue
            size = _parameters(spec, "input").get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise InvalidInput(
                        f"input {excerpt(str(spec.get('name')))}: "
                        f"binary_data_size {repr(size)[:64]} "
                        f"does not fit the {len(binary)} binary bytes sent"
                    )
                raw = binary[offset : offset + size]
                offset += size
        name, array = decode_tensor(spec, raw, max_elements=max_elements)
        if name in inputs:
            raise InvalidInput(f"input {excerpt(name)} is given twice")
        inputs[name] = array
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} binary bytes are not claimed by any input")

    params = _parameters(doc, "request")
    binary_outputs = bool(params.get("binary_data_output", False))
    if params is _NO_PARAMETERS:
        params = {}  # the request's own: callers may add to it
    outputs = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for out in doc["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInput("each requested output must be an object with a string 'name'")
            out_params = _parameters(out, "output")
            wants = out_params.get("binary_data", binary_outputs)
            ref = shared_ref(out_params, f"output {excerpt(out['name'])}")
            outputs.append(RequestedOutput(out["name"], bool(wants), ref))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferRequest(
        inputs=inputs,
        id=request_id,
        parameters=params,
        outputs=outputs,
        binary_outputs=binary_outputs,
        shared=shared,
    )


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """Serialise a response; returns (body, json_length if binary tensors follow else None)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in response.outputs.items():
        spec, raw = encode_tensor(
            name, array, binary=response.binary.get(name, False), numpy_data=True
        )
        outputs.append(spec)
        if raw is not None:
            chunks.append(raw)
    # No parameters on these: perf_analyzer reads any there as binary data's.
    outputs.extend({k: placed[k] for k in ("name", "datatype", "shape")}
                   for placed in response.placed.values())  # fmt: skip
    doc: dict[str, Any] = {"model_name": response.model_name, "outputs": outputs}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def encode_request(request: InferRequest, *, binary: bool) -> tuple[bytes, int | None]:
    """A client's REST body for ``request``; with ``binary`` tensors travel raw both ways.

    Returns (body, json_length if binary tensors follow else None).
    """
    specs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in request.inputs.items():
        spec, raw = encode_tensor(name, np.asarray(array), binary=binary, numpy_data=True)
        specs.append(spec)
        if raw is not None:
            chunks.append(raw)
    for name, ref in request.shared.items():
        specs.append({"name": name, "datatype": ref.datatype, "shape": ref.shape,
                      "parameters": _shared_parameters(ref)})  # fmt: skip
    doc: dict[str, Any] = {"inputs": specs}
    if request.id is not None:
        doc["id"] = request.id
    params = dict(request.parameters)
    if binary or request.binary_outputs:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    if request.outputs is not None:
        doc["outputs"] = [
            {"name": o.name, "parameters": {"binary_data": o.binary,
                                            **(_shared_parameters(o.shm) if o.shm else {})}}
            for o in request.outputs
        ]  # fmt: skip
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _shared_parameters(ref: SharedRef) -> dict[str, Any]:
    return {"shared_memory_region": ref.region, "shared_memory_byte_size": ref.byte_size,
            "shared_memory_offset": ref.offset}  # fmt: skip


def decode_response(body: bytes, json_length: int | None = None) -> InferResponse:
    """A REST infer answer (JSON, or JSON followed by raw tensors) as the client sees it."""
    header = body if json_length is None else body[:json_length]
    raw = memoryview(body)[len(header) :]
    doc = orjson.loads(header)
    outputs: dict[str, np.ndarray] = {}
    placed: dict[str, dict[str, Any]] = {}
    offset = 0
    for spec in doc["outputs"]:
        size = spec.get("parameters", {}).get("binary_data_size")
        if size is None and "data" not in spec:  # written to shared memory
            placed[spec["name"]] = spec
            continue
        chunk = None
        if size is not None:
            chunk, offset = raw[offset : offset + size], offset + size
        name, array = decode_tensor(spec, chunk, null_as_nan=True)
        outputs[name] = array
    return InferResponse(
        model_name=doc.get("model_name", ""),
        model_version=doc.get("model_version"),
        outputs=outputs,
        id=doc.get("id"),
        parameters=doc.get("parameters") or {},
        placed=placed,
    )
