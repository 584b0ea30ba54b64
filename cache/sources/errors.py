"""Error classification for every source: transient or permanent, and a message to act on.

Library errors (aiohttp, botocore, gcsfs, http.client, the OS) are translated into
:mod:`nodecache.cache.errors` at this one boundary, with credentials masked.
"""

from __future__ import annotations

import errno
import http.client
import re
from collections.abc import Mapping
from http import HTTPStatus

from nodecache.cache.errors import CacheError, FetchError, InsufficientSpaceError, IntegrityError
from nodecache.cache.uri import redact_uri

__all__ = [
    "SourceHttpError",
    "is_transient",
    "mask_secrets",
    "parse_http_error",
    "scrub",
    "translate_error",
]


class SourceHttpError(Exception):
    """An HTTP error status from a source, with the source's own code and message."""

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"HTTP {status} {code} {message}".strip())


_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 411, 416}
_PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "NoSuchKey",
    "InvalidBucketName",
    "AccountProblem",
    "ExpiredToken",
    "InvalidToken",
    "InvalidObjectState",
    "PermanentRedirect",  # the bucket is in another region than the one configured
    "AuthorizationHeaderMalformed",
}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
_URL_SECRETS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]*@|\?[^\s'\"]*")


def parse_http_error(status: int, body: bytes) -> SourceHttpError:
    """The error of an HTTP answer, with S3's ``<Code>`` and ``<Message>`` where present."""
    text = body.decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    return SourceHttpError(
        status,
        code.group(1) if code else "",
        scrub(message.group(1)) if message else "",
    )


def scrub(text: str) -> str:
    """Mask anything URL-shaped in ``text`` that could carry a secret (user info, query)."""
    return _URL_SECRETS.sub(
        lambda m: (m.group("scheme") + "***@") if m.group("scheme") else "?***", text
    )


def mask_secrets(error: CacheError, credentials: Mapping[str, str] | None) -> CacheError:
    """Replace any credential value that slipped into ``error``'s message with ``***``."""
    if not credentials or not error.args:
        return error
    message = str(error.args[0])
    for name, value in credentials.items():
        if value and len(value) >= 4 and "FILE" not in name and "ENDPOINT" not in name:
            message = message.replace(value, "***")
    error.args = (message, *error.args[1:])
    return error


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request later may succeed."""
    if isinstance(exc, FetchError):
        return not exc.permanent
    if isinstance(exc, CacheError):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return False
    known = (
        isinstance(exc, OSError | SourceHttpError | http.client.HTTPException)
        or _is_transport_error(exc)
        or _status_of(exc) is not None
        or _code_of(exc) is not None
    )
    # Anything else is a bug or a surprise: fail now rather than retry it.
    return known and not _classify(exc)[0]


def translate_error(exc: BaseException, uri: str, path: str | None = None) -> CacheError:
    """Turn a library error into a :class:`CacheError` with a message a person can act on."""
    if isinstance(exc, CacheError):
        return exc
    where = redact_uri(uri) if path is None else f"{path!r} of {redact_uri(uri)}"
    permanent, detail = _classify(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(f"disk full while fetching {where}: {detail}")
    if isinstance(exc, SourceHttpError) and exc.code == "PreconditionFailed":
        return IntegrityError(f"{where} changed on the source during the download")
    kind = "permanent" if permanent else "transient"
    return FetchError(f"fetching {where} failed ({kind}): {detail}", permanent=permanent)


def _classify(exc: BaseException) -> tuple[bool, str]:
    """Return (permanent, short description) for a library error."""
    name = type(exc).__name__
    text = scrub(str(exc)) or name
    if isinstance(exc, SourceHttpError):
        permanent = exc.status in _PERMANENT_HTTP or exc.code in _PERMANENT_CODES
        if exc.code in _TRANSIENT_CODES:
            permanent = False
        return permanent, _http_detail(exc.status, exc)
    if _is_transport_error(exc):
        return False, f"{name}: {text}"
    status = _status_of(exc)
    code = _code_of(exc)
    if code in _PERMANENT_CODES:
        return True, f"{code}: {text}"
    if code in _TRANSIENT_CODES:
        return False, f"{code}: {text}"
    if status is not None:
        return status in _PERMANENT_HTTP, _http_detail(status, exc)
    if isinstance(exc, FileNotFoundError):
        return True, "not found"
    if isinstance(exc, PermissionError):
        return True, f"access denied: {text}"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return True, f"{name}: {text}"
    if isinstance(exc, TimeoutError):
        return False, f"timed out: {text}"
    return False, f"{name}: {text}"


def _is_transport_error(exc: BaseException) -> bool:
    """A connection-level failure (reset, truncated body, timeout): always worth a retry."""
    import aiohttp

    transport = (
        aiohttp.ClientPayloadError,
        aiohttp.ClientConnectionError,
        aiohttp.ServerTimeoutError,
        http.client.HTTPException,
        ConnectionError,
        TimeoutError,
    )
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            break
        if isinstance(current, transport) and not isinstance(current, FileNotFoundError):
            return True
        current = current.__cause__ or current.__context__
    return False


def _http_detail(status: int, exc: BaseException) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    detail = f"HTTP {status} {phrase}".rstrip()
    if status == 404:
        detail += " (not found)"
    code = getattr(exc, "code", "")
    if isinstance(code, str) and code:
        detail += f" {code}"
    message = scrub(str(getattr(exc, "message", "") or "")).strip()
    if message and message.lower() != phrase.lower() and "://" not in message:
        detail += f": {message}"
    return detail


def _status_of(exc: BaseException, depth: int = 0) -> int | None:
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and depth < 5:
        return _status_of(cause, depth + 1)
    return None


def _code_of(exc: BaseException, depth: int = 0) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and depth < 5:
        return _code_of(cause, depth + 1)
    return None
