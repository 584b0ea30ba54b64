"""nodecache disk tier: fetch models from object storage onto node-local disk, verified.

Imports nothing from ``serve`` or ``agent``.
"""

from cache.errors import (
    CacheError,
    FetchError,
    InsufficientSpaceError,
    IntegrityError,
    InvalidSourceError,
)
from cache.fetch import MANIFEST_NAME, FetchOptions
from cache.store import ModelStore, Progress, StoredFile, StoredModel
from cache.uri import SUPPORTED_SCHEMES, redact_uri, validate_source_uri

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_SCHEMES",
    "CacheError",
    "FetchError",
    "FetchOptions",
    "InsufficientSpaceError",
    "IntegrityError",
    "InvalidSourceError",
    "ModelStore",
    "Progress",
    "StoredFile",
    "StoredModel",
    "redact_uri",
    "validate_source_uri",
]
