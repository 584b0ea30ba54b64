"""Errors the serving tier raises; each one knows the HTTP status and the gRPC code it
answers with, side by side: the only mapping of errors to protocol codes.

The HTTP adapter turns them into Open Inference Protocol error bodies
(``{"error": "..."}``), the gRPC servicer into a status with the same message. The
message goes to the client as it is, so anything a client sent is quoted through
``excerpt`` and anything a library said through ``clean_message``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "CONTROL_ANSWERS",
    "RELAYED_ANSWERS",
    "CallerUnknown",
    "Forbidden",
    "InvalidInput",
    "MethodNotAllowed",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "NoRoom",
    "OutputTooLarge",
    "PayloadTooLarge",
    "ServeError",
    "ServerOverloaded",
    "Unimplemented",
    "WorkerUnavailable",
    "answered",
    "clean_message",
    "excerpt",
]


class ServeError(Exception):
    """Base of every error that reaches a client."""

    # HTTP status, and the ``grpc.StatusCode`` member name for the same answer.
    status: int = 500
    grpc_code: str = "INTERNAL"
    retry_after: float | None = None


class InvalidInput(ServeError):
    """The request is malformed or does not match the model's inputs (400)."""

    status, grpc_code = 400, "INVALID_ARGUMENT"


class ModelNotFound(ServeError):
    """No model (or version) of that name is declared on this node (404)."""

    status, grpc_code = 404, "NOT_FOUND"

    def __init__(self, name: str, version: str | None = None) -> None:
        what = f"model {excerpt(name)}"
        if version is not None:
            what += f" version {excerpt(version)}"
        super().__init__(f"{what} not found")
        self.name = name


class PayloadTooLarge(ServeError):
    """The request body is above the configured limit (413)."""

    status, grpc_code = 413, "RESOURCE_EXHAUSTED"


class OutputTooLarge(ServeError):
    """The answer would be above the configured output limit.

    400, not 413: the request itself was within bounds (413 speaks of the request's
    content, and makes clients shrink or drop their body); what it asked for is not.
    gRPC says RESOURCE_EXHAUSTED, as it does for a message over its own size limit.
    """

    status, grpc_code = 400, "RESOURCE_EXHAUSTED"


class ModelNotReady(ServeError):
    """The model is declared but cannot answer yet: still downloading or failed (503)."""

    status, grpc_code = 503, "UNAVAILABLE"
    retry_after = 1.0


class ServerOverloaded(ServeError):
    """Too many requests are already waiting; come back later (503)."""

    status, grpc_code = 503, "UNAVAILABLE"
    retry_after = 1.0


class Forbidden(ServeError):
    """The model is another namespace's, or closed to the caller's (403)."""

    status, grpc_code = 403, "PERMISSION_DENIED"


class ModelLoadError(ServeError):
    """The model's files are on disk but the runtime could not load them (500)."""

    status, grpc_code = 500, "INTERNAL"


class NoRoom(ServeError):
    """No device can take the model, even after evicting what may be evicted (503)."""

    status, grpc_code = 503, "UNAVAILABLE"
    retry_after = 5.0


class WorkerUnavailable(ServeError):
    """The model's worker is restarting, stopped mid-request, or is at its limit (503)."""

    status, grpc_code = 503, "UNAVAILABLE"
    retry_after = 1.0


class MethodNotAllowed(ServeError):
    """The routed path relays only GET, HEAD and POST (405)."""

    status = 405


class Unimplemented(ServeError):
    """A part of the protocol this node does not serve (CUDA shared memory without a GPU
    runtime, tracing, log settings): 400 over HTTP, UNIMPLEMENTED over gRPC."""

    status, grpc_code = 400, "UNIMPLEMENTED"


class CallerUnknown(Forbidden):
    """The call needs to know which process sent it (shared memory is the caller's own)
    and the connection does not tell (403)."""


# A worker's error answer, by HTTP status, as the error it stands for here; any other
# status is a ModelLoadError. Control calls (register, load, ...) and relayed OIP requests
# (gRPC in worker mode) read a worker's statuses differently.
CONTROL_ANSWERS: Mapping[int, type[ServeError]] = {503: NoRoom, 404: ModelNotFound}
RELAYED_ANSWERS: Mapping[int, type[ServeError]] = {
    404: ModelNotFound,
    403: Forbidden,
    400: InvalidInput,
    413: InvalidInput,
    503: WorkerUnavailable,
}


def answered(status: int, message: str, table: Mapping[int, type[ServeError]]) -> ServeError:
    """The error a worker answered with (``status`` and its ``{"error": message}``), as our
    own error with the worker's message as it is (it was already fit for a client)."""
    kind = table.get(status, ModelLoadError)
    error = Exception.__new__(kind)
    Exception.__init__(error, message or f"the worker answered {status}")
    return error


_EXCERPT_CHARS = 64


def excerpt(text: str, limit: int = _EXCERPT_CHARS) -> str:
    """``text`` quoted for an error message: repr-escaped (no control characters reach
    a log line or a header) and cut to ``limit`` characters, so a client that sends a
    megabyte-long name does not get it echoed back."""
    if len(text) > limit:
        return repr(text[:limit])[:-1] + "...'"
    return repr(text)


# An absolute path (a build tree's /onnxruntime_src/..., a site-packages file): it and
# what follows it (the C++ signature, a traceback) say nothing a client can act on.
_PATH = re.compile(r"(?:^|(?<=[\s'\"(=]))/[\w.+-]+/")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_MESSAGE_CHARS = 300


def clean_message(text: str) -> str:
    """A library's error message fit for a client: no leading onnxruntime status, no
    source paths or anything after the first one, one line, at most a few hundred
    characters."""
    text = _ORT_PREFIX.sub("", text)
    if (path := _PATH.search(text)) is not None:
        text = text[: path.start()]
    text = " ".join(text.split()).rstrip(" :")
    if text.endswith("Status Message"):  # onnxruntime's label for what was cut
        text = text[: -len("Status Message")].rstrip(" :")
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "..."
    return text or "no details"
