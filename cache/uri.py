"""Source URIs: validation, normalisation and redaction.

A source URI names either one object or a folder of objects. Validation happens up front, so a
malformed declaration is refused with a message a person can act on instead of failing later
inside a download.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

from nodecache.cache.azure_uri import AZURE_SCHEMES, is_blob_url, parse_azure_uri
from nodecache.cache.errors import InvalidSourceError
from nodecache.cache.hf_uri import parse_hf_uri
from nodecache.cache.models_uri import parse_models_uri
from nodecache.cache.ociref import parse_oci_uri

__all__ = ["SUPPORTED_SCHEMES", "redact_uri", "validate_source_uri"]

SUPPORTED_SCHEMES: tuple[str, ...] = (
    "file",
    "http",
    "https",
    "s3",
    "gs",
    "models",
    "hf",
    "oci",
    *AZURE_SCHEMES,
)

_SUPPORTED = ", ".join(SUPPORTED_SCHEMES)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# S3 and GCS bucket names: lowercase letters, digits, dots, hyphens (GCS also underscores).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def redact_uri(uri: object) -> str:
    """Return ``uri`` with anything that may hold a secret (user info, query) masked.

    Never raises; used in every message that mentions a source.
    """
    text = str(uri)
    try:
        parts = urlsplit(text)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", text.split("?", 1)[0])
    netloc = parts.netloc
    abfs = parts.scheme.lower() in ("abfs", "abfss") and ":" not in netloc.rpartition("@")[0]
    if "@" in netloc and not abfs:  # abfs names CONTAINER@ACCOUNT: no secret there
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "***" if parts.query else ""
    return SplitResult(parts.scheme, netloc, parts.path, query, "").geturl()


def validate_source_uri(uri: str) -> str:
    """Return the normalised form of ``uri``, or raise :class:`InvalidSourceError`.

    Normalisation lowercases the scheme and host, and drops a trailing ``/`` for ``file``,
    ``s3`` and ``gs`` (whether those name a folder is decided by listing the source). For
    ``http(s)`` a trailing ``/`` is kept: it is what says "this URL is a folder index".
    """
    if not isinstance(uri, str):
        raise InvalidSourceError(f"source URI must be a string, not {type(uri).__name__}")
    text = uri.strip()
    if not text:
        raise InvalidSourceError(f"empty source URI; supported schemes: {_SUPPORTED}")
    shown = redact_uri(text)
    if _CONTROL.search(text):
        raise InvalidSourceError(f"control characters in source URI {shown!r}")
    if text[:7].lower() == "models:":  # MLflow's form has one slash: models:/NAME/VERSION
        return str(parse_models_uri(text, shown))
    if "://" not in text:
        hint = f" (for a local path use 'file://{text}')" if text.startswith("/") else ""
        raise InvalidSourceError(f"missing scheme in {shown!r}; supported: {_SUPPORTED}{hint}")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InvalidSourceError(f"malformed source URI {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise InvalidSourceError(f"unknown scheme {scheme!r} in {shown!r}; supported: {_SUPPORTED}")
    if scheme in AZURE_SCHEMES or is_blob_url(text):
        return parse_azure_uri(text, shown)[0]
    if "@" in parts.netloc:
        raise InvalidSourceError(
            f"credentials embedded in source URI {shown!r}; "
            "pass them through the storage credentials reference instead"
        )
    if parts.fragment:
        raise InvalidSourceError(f"unexpected '#' fragment in source URI {shown!r}")
    if scheme == "hf":
        return str(parse_hf_uri(text, shown))
    if scheme == "oci":
        return parse_oci_uri(text).uri()
    if scheme == "file":
        return _file(parts, shown)
    if scheme in ("http", "https"):
        return _http(scheme, parts, shown)
    return _bucket(scheme, parts, shown)


def _check_segments(path: str, shown: str) -> None:
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise InvalidSourceError(f"'{segment}' path segment in source URI {shown!r}")


def _file(parts: SplitResult, shown: str) -> str:
    if parts.netloc not in ("", "localhost"):
        raise InvalidSourceError(
            f"file URI {shown!r} has host {parts.netloc!r}; "
            "write an absolute path with three slashes, e.g. 'file:///models/resnet'"
        )
    if parts.query:
        raise InvalidSourceError(f"unexpected '?' query in file URI {shown!r}")
    path = re.sub("/+", "/", parts.path).rstrip("/")
    if not path:
        raise InvalidSourceError(f"missing path in file URI {shown!r}")
    _check_segments(path, shown)
    return f"file://{path}"


def _http(scheme: str, parts: SplitResult, shown: str) -> str:
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise InvalidSourceError(f"malformed host in source URI {shown!r}: {exc}") from None
    if not host:
        raise InvalidSourceError(f"empty host in source URI {shown!r}")
    if not parts.path or parts.path == "/":
        raise InvalidSourceError(
            f"missing path in source URI {shown!r}; name a file or a folder ending in '/'"
        )
    _check_segments(parts.path, shown)
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return SplitResult(scheme, netloc, parts.path, parts.query, "").geturl()


def _bucket(scheme: str, parts: SplitResult, shown: str) -> str:
    bucket = parts.netloc
    if not bucket:
        raise InvalidSourceError(f"empty bucket in source URI {shown!r}")
    if not _BUCKET.match(bucket):
        raise InvalidSourceError(
            f"invalid bucket name {bucket!r} in source URI {shown!r}; "
            "use 3-222 lowercase letters, digits, '.', '-' or '_'"
        )
    if parts.query:
        raise InvalidSourceError(f"unexpected '?' query in source URI {shown!r}")
    key = parts.path.strip("/")
    if not key:
        raise InvalidSourceError(
            f"missing path in source URI {shown!r}; name an object or a folder in the bucket"
        )
    if "//" in key:
        raise InvalidSourceError(f"empty path segment in source URI {shown!r}")
    _check_segments(key, shown)
    return f"{scheme}://{bucket}/{key}"
