"""Our errors for the Kubernetes API, so callers never see the client's exception types."""

from __future__ import annotations

import json

from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

__all__ = [
    "ApiConflict",
    "ApiError",
    "ApiGone",
    "ApiInvalid",
    "ApiNotFound",
    "ApiUnavailable",
    "translate",
]


class ApiError(Exception):
    """The API server refused or failed a request."""

    status: int | None = None


class ApiUnavailable(ApiError):
    """Not reachable, timed out, or 5xx/429: retry with backoff."""


class ApiNotFound(ApiError):
    status = 404


class ApiConflict(ApiError):
    """409: a stale resourceVersion, or the object already exists: re-read and retry."""

    status = 409


class ApiGone(ApiError):
    """410: the resourceVersion is too old to watch from: list again."""

    status = 410


class ApiInvalid(ApiError):
    """422 (or another 4xx): the request itself is wrong; retrying will not help."""


def translate(exc: BaseException) -> ApiError:
    """The ApiError for a client exception (connection errors become ApiUnavailable)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ApiException):
        message = _message(exc)
        code = exc.status or 0
        cls = {404: ApiNotFound, 409: ApiConflict, 410: ApiGone}.get(code)
        if cls is None:
            cls = ApiUnavailable if code == 0 or code == 429 or code >= 500 else ApiInvalid
        error = cls(f"{code} {message}")
        error.status = code
        return error
    if isinstance(exc, Urllib3Error | OSError | TimeoutError):
        return ApiUnavailable(f"API server unreachable: {exc}")
    raise exc


def _message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.reason or "")
