"""nodecache disk tier: fetch models from object storage onto node-local disk, verified.

Imports nothing from ``serve`` or ``agent``.
"""

from cache.errors import (
    CacheError,
    FetchError,
    InsufficientSpaceError,
    IntegrityError,
    InvalidSourceError,
    ModelInUseError,
)
from cache.fetch import FetchOptions
from cache.sources import DERIVED_DIR, MANIFEST_NAME
from cache.store import (
    ModelStore,
    Progress,
    StoredFile,
    StoredModel,
    StoreStats,
    format_bytes,
)
from cache.uri import SUPPORTED_SCHEMES, redact_uri, validate_source_uri

__all__ = [
    "DERIVED_DIR",
    "MANIFEST_NAME",
    "SUPPORTED_SCHEMES",
    "CacheError",
    "FetchError",
    "FetchOptions",
    "InsufficientSpaceError",
    "IntegrityError",
    "InvalidSourceError",
    "ModelInUseError",
    "ModelStore",
    "Progress",
    "StoreStats",
    "StoredFile",
    "StoredModel",
    "format_bytes",
    "redact_uri",
    "validate_source_uri",
]
