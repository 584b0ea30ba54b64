"""Open Inference Protocol tensors <-> numpy arrays, JSON and binary forms.

One table maps OIP datatypes to numpy dtypes; everything else is derived from it.
Errors name the tensor so a client can tell which input was wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from math import prod
from typing import Any, NoReturn

import numpy as np

from nodecache.serve.errors import InvalidInput, excerpt

__all__ = [
    "DATATYPES",
    "datatype_of",
    "decode_tensor",
    "encode_tensor",
    "encoded_size",
]

# OIP datatype -> numpy dtype (little-endian, as the binary extension requires).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}


# Exact numpy dtype -> OIP datatype: the common case of ``datatype_of`` in one lookup.
_BY_DTYPE = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name for a numpy array (strings and bytes are BYTES)."""
    found = _BY_DTYPE.get(array.dtype)
    if found is not None:
        return found
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_KIND_SIZE[(array.dtype.kind, array.dtype.itemsize)]
    except KeyError:
        raise TypeError(
            f"numpy dtype {array.dtype} has no Open Inference Protocol datatype"
        ) from None


def _shape_of(name: str, spec: dict[str, Any]) -> tuple[int, ...]:
    shape = spec.get("shape")
    if type(shape) is list:
        for d in shape:
            # bool is an int subclass: true/false are no dimensions.
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(shape)
    raise InvalidInput(f"tensor {excerpt(name)}: 'shape' must be a list of non-negative integers")


def _refuse_datatype(name: str, datatype: Any) -> NoReturn:
    known = ", ".join(DATATYPES)
    shown = excerpt(datatype) if isinstance(datatype, str) else type(datatype).__name__
    raise InvalidInput(f"tensor {excerpt(name)}: unknown datatype {shown}; expected one of {known}")


def decode_tensor(
    spec: Any,
    raw: bytes | memoryview | None = None,
    *,
    max_elements: int | None = None,
    null_as_nan: bool = False,
) -> tuple[str, np.ndarray]:
    """Turn one request tensor into (name, array shaped as declared).

    ``raw`` holds the tensor's bytes when it came through the binary tensor data
    extension; otherwise the values are read from ``spec["data"]``. The declared shape is
    checked against ``max_elements`` before anything is allocated, and data never turns
    into more elements than the shape declares. ``null_as_nan`` reads answers, whose JSON
    writes non-finite floats as null.
    """
    if type(spec) is not dict or type(name := spec.get("name")) is not str:
        raise InvalidInput("each tensor must be an object with a string 'name'")
    datatype = spec.get("datatype")
    dtype = DATATYPES.get(datatype) if type(datatype) is str else None
    if dtype is None:
        _refuse_datatype(name, datatype)
    shape = _shape_of(name, spec)
    count = prod(shape)
    if max_elements is not None and count > max_elements:
        raise InvalidInput(
            f"tensor {excerpt(name)}: shape {list(shape)} has {count} elements, "
            f"over the limit of {max_elements}"
        )
    if raw is not None:
        if datatype == "BYTES":
            array = _bytes_from_binary(name, raw, count)
        elif len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"tensor {excerpt(name)}: binary data has {len(raw)} bytes, "
                f"shape needs {count * dtype.itemsize}"
            )
        else:
            array = np.frombuffer(raw, dtype=dtype)
    else:
        if "data" not in spec:
            raise InvalidInput(f"tensor {excerpt(name)}: no 'data' and no binary data")
        array = _from_json(name, datatype, dtype, spec["data"], count, shape, null_as_nan)
    return name, array.reshape(shape)


# Python types JSON (or gRPC typed contents) may hold for each kind of datatype. bool is
# its own type here, not an int: ``true`` is no 1, ``"1.5"`` no number.
_VALUE_TYPES = {
    "b": frozenset({bool}),
    "i": frozenset({int}),
    "u": frozenset({int}),
    "f": frozenset({int, float}),
    "O": frozenset({str, bytes}),
}
_WANTED = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers", "O": "strings"}


def _from_json(
    name: str,
    datatype: str,
    dtype: np.dtype,
    data: Any,
    count: int,
    shape: tuple[int, ...],
    null_as_nan: bool = False,
) -> np.ndarray:
    """The flat array of ``data`` (a flat or nested list), refusing anything that would
    silently change value: booleans or fractions as integers, strings as numbers, values
    out of the datatype's range (300 as UINT8, 1e39 as FP32)."""
    flat = data if isinstance(data, list) else [data]
    types = set(map(type, flat))
    if list in types:  # nested rows: numpy checks that they are rectangular
        try:
            flat = np.array(flat, dtype=object).ravel()
        except ValueError:
            _refuse_ragged(name)
        types = set(map(type, flat))
        if list in types:  # rows of different lengths, or nested past numpy's 64 dimensions
            _refuse_ragged(name)
    if len(flat) != count:
        raise InvalidInput(
            f"tensor {excerpt(name)}: shape {list(shape)} needs {count} elements, got {len(flat)}"
        )
    if null_as_nan and dtype.kind == "f":
        types.discard(type(None))
    if not types <= _VALUE_TYPES[dtype.kind]:
        raise InvalidInput(f"tensor {excerpt(name)}: {datatype} data must be {_WANTED[dtype.kind]}")
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = [x.encode() if type(x) is str else x for x in flat]
        return array
    if dtype.kind in "iu":
        return _integers(name, datatype, dtype, flat)
    # FP16/FP32: Python's min and max of a request's floats cost less than numpy's (written
    # so that a NaN, which compares false, also takes the careful path).
    edge = _FLOAT_EDGE.get(dtype)
    in_range = edge is None or not count or null_as_nan or -edge <= min(flat) <= max(flat) <= edge
    if not in_range:
        return _floats_past_the_edge(name, datatype, dtype, flat)
    return np.array(flat, dtype=dtype)


def _refuse_ragged(name: str) -> NoReturn:
    raise InvalidInput(f"tensor {excerpt(name)}: nested 'data' must be rectangular rows")


_INT_RANGES = {dt: np.iinfo(dt) for dt in DATATYPES.values() if dt.kind in "iu"}
# The largest finite FP16 and FP32 (FP64: nothing to check, JSON has no number beyond it).
_FLOAT_EDGE = {dt: float(np.finfo(dt).max) for dt in (DATATYPES["FP16"], DATATYPES["FP32"])}


def _integers(name: str, datatype: str, dtype: np.dtype, flat: Any) -> np.ndarray:
    info = _INT_RANGES[dtype]
    try:
        values = np.array(flat, dtype=np.int64)
        if values.size and (values.min() < info.min or values.max() > info.max):
            _refuse_range(name, datatype)
    except OverflowError:  # above INT64: fine for UINT64, if none is negative
        try:
            values = np.array(flat, dtype=np.uint64)
        except OverflowError:
            _refuse_range(name, datatype)
        if dtype != DATATYPES["UINT64"]:
            _refuse_range(name, datatype)
    return values.astype(dtype, copy=False)


def _floats_past_the_edge(name: str, datatype: str, dtype: np.dtype, flat: Any) -> np.ndarray:
    """Values past the datatype's largest: refuse those that would become infinity (1e39
    as FP32); keep those that round to the largest, and infinity sent as such (gRPC's
    typed floats can hold it)."""
    with np.errstate(over="ignore"):
        array = np.array(flat, dtype=dtype)
    if (np.isinf(array) & np.isfinite(np.array(flat, dtype=np.float64))).any():
        _refuse_range(name, datatype)
    return array


def _refuse_range(name: str, datatype: str) -> NoReturn:
    raise InvalidInput(f"tensor {excerpt(name)}: value out of range for {datatype}")


_LENGTH = struct.Struct("<I")


def _bytes_from_binary(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    """The ``count`` BYTES elements of ``raw``, each behind its 4-byte little-endian length.

    Bounded by what the shape declares: a body of millions of empty elements is refused
    before any allocation unless its shape says so, and then costs one object pointer each
    (empty and one-byte strings are shared)."""
    if len(raw) < 4 * count:
        raise InvalidInput(
            f"tensor {excerpt(name)}: binary data has {len(raw)} bytes, "
            f"too few for {count} BYTES elements"
        )
    data = bytes(raw)
    end = len(data)
    unpack = _LENGTH.unpack_from
    read = 0  # bytes the elements taken so far occupy

    def elements() -> Iterator[bytes]:
        nonlocal read
        offset = 0
        for _ in range(count):
            if offset + 4 > end:
                raise InvalidInput(f"tensor {excerpt(name)}: truncated BYTES length prefix")
            (length,) = unpack(data, offset)
            start = offset + 4
            offset = start + length
            if offset > end:
                raise InvalidInput(
                    f"tensor {excerpt(name)}: BYTES element overruns the binary data"
                )
            read = offset  # fromiter stops taking at count: never past the last yield
            yield data[start:offset]

    # Straight into the array: no list of them on the side.
    array = np.fromiter(elements(), dtype=object, count=count)
    if read != end:
        raise InvalidInput(
            f"tensor {excerpt(name)}: binary data holds more than the {count} BYTES elements "
            "its shape declares"
        )
    return array


def encode_tensor(
    name: str, array: np.ndarray, *, binary: bool, numpy_data: bool = False
) -> tuple[dict[str, Any], bytes | None]:
    """Turn one output array into its OIP JSON object, plus its bytes if ``binary``.

    With ``numpy_data`` the JSON ``data`` stays a flat array, for a serializer that
    writes numpy itself (orjson) instead of building a Python list first.
    """
    array = np.asarray(array)
    datatype = datatype_of(array)
    spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        if datatype == "BYTES":
            raw = b"".join(
                struct.pack("<I", len(b)) + b for b in (_as_bytes(x) for x in array.ravel())
            )
        elif array.dtype is DATATYPES[datatype]:
            raw = array.tobytes()  # C order, whatever the array's layout
        else:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
        spec["parameters"] = {"binary_data_size": len(raw)}
        return spec, raw
    if datatype == "BYTES":
        try:
            spec["data"] = [_as_bytes(x).decode() for x in array.ravel()]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output '{name}' holds bytes that are not UTF-8; "
                "ask for it with binary_data_output"
            ) from None
    elif numpy_data:
        spec["data"] = np.ascontiguousarray(array).ravel()
    else:
        spec["data"] = array.ravel().tolist()
    return spec, None


def encoded_size(array: np.ndarray) -> int:
    """Bytes the array takes in an answer's binary form (BYTES: each element behind its
    4-byte length); a JSON answer of the same tensor is a few times this at most."""
    if array.dtype.kind not in "OSU":
        return array.nbytes
    return sum(4 + len(_as_bytes(x)) for x in array.ravel())


def _as_bytes(item: Any) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)
