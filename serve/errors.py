"""Errors the serving tier raises; each one knows the HTTP status it answers with.

The HTTP adapter is the only place that turns them into responses, always as an
Open Inference Protocol error body: ``{"error": "..."}``.
"""

from __future__ import annotations

__all__ = [
    "InvalidInput",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "NoRoom",
    "PayloadTooLarge",
    "ServeError",
    "ServerOverloaded",
]


class ServeError(Exception):
    """Base of every error that reaches a client."""

    status: int = 500
    retry_after: float | None = None


class InvalidInput(ServeError):
    """The request is malformed or does not match the model's inputs (400)."""

    status = 400


class ModelNotFound(ServeError):
    """No model (or version) of that name is declared on this node (404)."""

    status = 404

    def __init__(self, name: str, version: str | None = None) -> None:
        what = f"model '{name}'" if version is None else f"model '{name}' version '{version}'"
        super().__init__(f"{what} not found")
        self.name = name


class PayloadTooLarge(ServeError):
    """The request body is above the configured limit (413)."""

    status = 413


class ModelNotReady(ServeError):
    """The model is declared but cannot answer yet: still downloading or failed (503)."""

    status = 503
    retry_after = 1.0


class ServerOverloaded(ServeError):
    """Too many requests are already waiting; come back later (503)."""

    status = 503
    retry_after = 1.0


class ModelLoadError(ServeError):
    """The model's files are on disk but the runtime could not load them (500)."""

    status = 500


class NoRoom(ServeError):
    """No device can take the model, even after evicting what may be evicted (503)."""

    status = 503
    retry_after = 5.0
