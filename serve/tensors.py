"""Open Inference Protocol tensors <-> numpy arrays, JSON and binary forms.

One table maps OIP datatypes to numpy dtypes; everything else is derived from it.
Errors name the tensor so a client can tell which input was wrong.
"""

from __future__ import annotations

import struct
from math import prod
from typing import Any, NoReturn

import numpy as np

from serve.errors import InvalidInput

__all__ = [
    "DATATYPES",
    "datatype_of",
    "decode_tensor",
    "encode_tensor",
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
    raise InvalidInput(f"tensor '{name}': 'shape' must be a list of non-negative integers")


def _refuse_datatype(name: str, datatype: Any) -> NoReturn:
    known = ", ".join(DATATYPES)
    raise InvalidInput(f"tensor '{name}': unknown datatype {datatype!r}; expected one of {known}")


def decode_tensor(
    spec: Any, raw: bytes | memoryview | None = None, *, max_elements: int | None = None
) -> tuple[str, np.ndarray]:
    """Turn one request tensor into (name, array shaped as declared).

    ``raw`` holds the tensor's bytes when it came through the binary tensor data
    extension; otherwise the values are read from ``spec["data"]``.
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
            f"tensor '{name}': shape {list(shape)} has {count} elements, "
            f"over the limit of {max_elements}"
        )
    if raw is not None:
        if datatype == "BYTES":
            array = _bytes_from_binary(name, raw)
        elif len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"tensor '{name}': binary data has {len(raw)} bytes, "
                f"shape needs {count * dtype.itemsize}"
            )
        else:
            array = np.frombuffer(raw, dtype=dtype)
    else:
        if "data" not in spec:
            raise InvalidInput(f"tensor '{name}': no 'data' and no binary data")
        array = _from_json(name, datatype, dtype, spec["data"])
    if array.size != count:
        raise InvalidInput(
            f"tensor '{name}': shape {list(shape)} needs {count} elements, got {array.size}"
        )
    return name, array.reshape(shape)


def _from_json(name: str, datatype: str, dtype: np.dtype, data: Any) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":
            flat = np.array(data, dtype=object).ravel()
            for i, item in enumerate(flat):
                if isinstance(item, str):
                    flat[i] = item.encode()
                elif not isinstance(item, bytes):
                    raise InvalidInput(f"tensor '{name}': BYTES elements must be strings")
            return flat
        if dtype.kind in "biu":
            # Refuse silent truncation of 1.5 -> 1 or true -> 1.
            if datatype == "UINT64":
                return _uint64(name, data)
            probe = np.asarray(data)
            allowed = "b" if dtype.kind == "b" else "iu"
            if probe.size and probe.dtype.kind not in allowed:
                raise InvalidInput(
                    f"tensor '{name}': {datatype} data must be "
                    f"{'true/false' if dtype.kind == 'b' else 'integers'}"
                )
            if dtype.kind in "iu":
                _check_int_range(name, datatype, dtype, probe)
            return probe.astype(dtype).ravel()
        return np.array(data, dtype=dtype).ravel()
    except InvalidInput:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"tensor '{name}': data does not fit {datatype}: {exc}") from None


def _uint64(name: str, data: list[Any]) -> np.ndarray:
    # numpy infers float64 for ints above int64's range: check the Python values instead.
    flat = np.array(data, dtype=object).ravel()
    if not all(type(v) is int for v in flat):
        raise InvalidInput(f"tensor '{name}': UINT64 data must be integers")
    return np.array(flat.tolist(), dtype=DATATYPES["UINT64"])


def _check_int_range(name: str, datatype: str, dtype: np.dtype, probe: np.ndarray) -> None:
    info = np.iinfo(dtype)
    if probe.size and (probe.min() < info.min or probe.max() > info.max):
        raise InvalidInput(f"tensor '{name}': value out of range for {datatype}")


def _bytes_from_binary(name: str, raw: bytes | memoryview) -> np.ndarray:
    """BYTES elements, each behind its 4-byte little-endian length."""
    items: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"tensor '{name}': truncated BYTES length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"tensor '{name}': BYTES element overruns the binary data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    array = np.empty(len(items), dtype=object)
    array[:] = items
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


def _as_bytes(item: Any) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)
