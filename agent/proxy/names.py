"""The one name change the proxy makes: KServe's model name outside, the cache's inside.

An InferenceService calls its model by its own name (the isvc's), the node knows it by the
cache's served name. Requests are renamed on the way in (REST paths, the gRPC name field)
and answers on the way out (``model_name`` / ``name`` in their JSON or protobuf), each by
splicing the few bytes that hold the name: a tensor payload is never parsed or re-encoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

import orjson

__all__ = [
    "SHARED_MEMORY_REFUSED",
    "BadMessage",
    "Names",
    "Route",
    "field_one",
    "names_shared_memory",
    "replace_field_one",
]

Buffer = bytes | memoryview
_HEADER_LENGTH = "inference-header-content-length"


class BadMessage(ValueError):
    """A protobuf message that does not parse (a client mistake: INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Route:
    """Where a client's REST target goes: ``kind`` names what the proxy does with it."""

    kind: str
    """``node``: relay ``target`` to the node; ``live``, ``ready``, ``v1-live``,
    ``v1-models``: answered here; ``other-model``, ``not-here``: 404."""
    target: str = ""
    renamed: str | None = None
    """The JSON key holding the model's name in the node's answer (``model_name`` for
    inference, ``name`` for metadata, readiness and configuration, ``model_stats`` for the
    names in Triton's statistics), or None when none needs renaming."""


@dataclass(frozen=True)
class Names:
    """``served``: the name clients use; ``model``: the cache's name on the node."""

    served: str
    model: str

    @property
    def same(self) -> bool:
        return self.served == self.model

    def route(self, path: str, query: str) -> Route:
        """The route for a raw (still percent-encoded) path and query string."""
        if path in ("/v2/health/live",):
            return Route("live")
        if path == "/v2/health/ready":
            return Route("ready")
        if path == "/":
            return Route("v1-live")
        if path == "/v1/models":
            return Route("v1-models")
        if path == "/v2":
            return Route("node", "/v2" + query)
        for prefix in ("/v2/models/", "/v1/models/"):
            if path.startswith(prefix):
                return self._model_route(prefix, path[len(prefix) :], query)
        return Route("not-here")

    def _model_route(self, prefix: str, rest: str, query: str) -> Route:
        if prefix == "/v1/models/":
            segment, colon, verb = rest.partition(":")
            if "/" in segment:
                return Route("not-here")
            tail = colon + verb
        else:
            segment, slash, tail = rest.partition("/")
            tail = slash + tail
        if unquote(segment) != self.served:
            return Route("other-model", unquote(segment))
        target = prefix + quote(self.model, safe="") + tail + query
        if self.same or tail.endswith(":predict"):
            return Route("node", target)
        if tail.endswith("/stats"):
            return Route("node", target, "model_stats")
        return Route("node", target, "model_name" if tail.endswith("/infer") else "name")

    def rename_json(self, key: str, head: Buffer) -> Sequence[Buffer] | None:
        """``head`` (a JSON object) with ``key`` set to the served name, as the buffers to
        write one after the other, or None if ``head`` does not name the model there.

        The node writes the key first (``{"model_name":"NAME",...``): then only those bytes
        change and the rest of ``head`` is written as it is; otherwise the object is
        parsed and written again (only small bodies take this path: metadata, readiness)."""
        if key == "model_stats":  # Triton's statistics: a list of entries, each named
            return self._rename_statistics(head)
        served = orjson.dumps(self.served)
        model = orjson.dumps(self.model)
        for space in (b"", b" "):
            old = b'{"' + key.encode() + b'":' + space + model
            if bytes(head[: len(old)]) == old and head[len(old) : len(old) + 1] in (b",", b"}"):
                new = b'{"' + key.encode() + b'":' + space + served
                return (new, memoryview(head)[len(old) :])
        try:
            doc = orjson.loads(head)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get(key) != self.model:
            return None
        doc[key] = self.served
        return (orjson.dumps(doc),)

    def _rename_statistics(self, head: Buffer) -> Sequence[Buffer] | None:
        try:
            doc = orjson.loads(head)
        except orjson.JSONDecodeError:
            return None
        entries = doc.get("model_stats") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            return None
        for entry in entries:
            if isinstance(entry, dict) and entry.get("name") == self.model:
                entry["name"] = self.served
        return (orjson.dumps(doc),)


# -- protobuf: the name is field 1 of every message the proxy renames ----------------------


def _varint(data: Buffer, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise BadMessage("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def field_one(data: Buffer) -> tuple[int, int, int] | None:
    """Where the last top-level field 1 (a string) lies in a serialized message, as
    (tag start, value start, value end), or None if it has none. The last one counts, as protobuf
    parsers take the last value of a repeated singular field. Only top-level fields are
    walked: a length-delimited field (a tensor) is skipped, never read."""
    found = None
    at, size = 0, len(data)
    while at < size:
        field_at = at
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise BadMessage("field number 0")
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            length, at = _varint(data, at)
            if number == 1:
                found = (field_at, at, at + length)
            at += length
        else:
            raise BadMessage(f"wire type {wire} is not used by this protocol")
        if at > size:
            raise BadMessage("a field runs past the end of the message")
    return found


def replace_field_one(data: Buffer, where: tuple[int, int, int] | None, value: str) -> bytes:
    """``data`` with the string field 1 at ``where`` (from :func:`field_one`) holding
    ``value`` instead; appended when the message had none. One copy of ``data``."""
    encoded = value.encode()
    field = b"\x0a" + _encode_varint(len(encoded)) + encoded
    view = memoryview(data)
    if where is None:
        return b"".join((view, field))
    tag_at, _, end = where
    return b"".join((view[:tag_at], field, view[end:]))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


SHARED_MEMORY_REFUSED = (
    "shared memory is not available through the proxy: its network clients share no memory "
    "with the node, and the regions of this pod's other containers are not theirs to use"
)


def names_shared_memory(body: bytes, headers: list[tuple[str, str]]) -> bool:
    """Whether a request's JSON part names a shared-memory region. The node scopes regions
    to the calling pod, and through the proxy that pod is the predictor's: a network client
    must never reach the regions its other containers registered. A byte search of the JSON
    part (not of binary tensors after it), so tensors are still never parsed here."""
    end = len(body)
    for name, value in headers:
        if name.lower() == _HEADER_LENGTH:
            with contextlib.suppress(ValueError):
                end = min(end, max(0, int(value)))
    return body.find(b"shared_memory_region", 0, end) >= 0
