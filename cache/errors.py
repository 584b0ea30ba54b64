"""Errors raised by the disk tier.

Everything ``cache/`` raises derives from :class:`CacheError`, itself an :class:`OSError`, so
callers that only care "did the disk tier fail" catch one type. Messages are written for the
person reading a model's status: what failed, for which source, and whether retrying can help.
They never contain credentials (see :func:`nodecache.cache.uri.redact_uri`).
"""

from __future__ import annotations

__all__ = [
    "CacheDirInUseError",
    "CacheError",
    "FetchError",
    "InsufficientSpaceError",
    "IntegrityError",
    "InvalidSourceError",
    "ModelInUseError",
    "SizeLimitError",
]


class CacheError(OSError):
    """Base of every error the disk tier raises."""

    def __init__(self, message: str) -> None:
        # One argument only: OSError(errno, strerror) would reinterpret a two-argument call.
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidSourceError(CacheError, ValueError):
    """The source URI is malformed or uses a scheme we do not support. Never retried."""


class FetchError(CacheError):
    """Reading from the source failed.

    ``permanent`` is True when retrying cannot help without someone changing something
    (not found, access denied, bad credentials); False for resets, timeouts, throttling, 5xx.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class SizeLimitError(FetchError):
    """The source lists or sends more bytes than the model's declared size allows.

    Permanent: the declaration (``modelSize``) or the source must change. Raised before
    downloading when the listing says so, or as soon as the bytes written go past the
    allowance (a source without a Content-Length); the partial copy is removed.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class IntegrityError(CacheError):
    """Bytes on disk do not match what the source publishes (size, ETag/MD5, crc32c).

    The partial copy is discarded and never published. Usually transient (the object changed
    during the download, or a proxy truncated it), so callers may retry.
    """


class InsufficientSpaceError(CacheError):
    """The model cannot fit: the quota (even after eviction) or the disk itself is too small.

    Raised before downloading when the size is known up front ("needs X, limit Y, free Z"),
    or when the disk fills up, or a source of unknown size streams past the room the store
    had for it, mid-download (the partial copy is removed).
    """

    def __init__(self, message: str, *, needed: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed


class ModelInUseError(CacheError):
    """The model is held by a reader (``ModelStore.use``) and cannot be removed now."""


class CacheDirInUseError(CacheError):
    """Another agent holds the cache directory (its start-up cleanup and garbage collection
    would delete what this one keeps). ``nodecache prefetch`` never takes this lock."""
