"""nodecache disk tier: fetch models from object storage onto node-local disk, verified.

Imports nothing from ``serve`` or ``agent``.
"""

from nodecache.cache.errors import (
    CacheDirInUseError,
    CacheError,
    FetchError,
    InsufficientSpaceError,
    IntegrityError,
    InvalidSourceError,
    ModelInUseError,
    SizeLimitError,
)
from nodecache.cache.layout import DERIVED_DIR, MANIFEST_NAME, model_files
from nodecache.cache.options import FetchOptions
from nodecache.cache.perms import DEFAULT_FILE_MODE, folder_mode, parse_file_mode
from nodecache.cache.stats import StoreStats
from nodecache.cache.store import (
    MODEL_SIZE_TOLERANCE,
    CacheDirLock,
    ModelStore,
    Progress,
    StoredFile,
    StoredModel,
    format_bytes,
)
from nodecache.cache.uri import SUPPORTED_SCHEMES, redact_uri, validate_source_uri

__all__ = [
    "DEFAULT_FILE_MODE",
    "DERIVED_DIR",
    "MANIFEST_NAME",
    "MODEL_SIZE_TOLERANCE",
    "SUPPORTED_SCHEMES",
    "CacheDirInUseError",
    "CacheDirLock",
    "CacheError",
    "FetchError",
    "FetchOptions",
    "InsufficientSpaceError",
    "IntegrityError",
    "InvalidSourceError",
    "ModelInUseError",
    "ModelStore",
    "Progress",
    "SizeLimitError",
    "StoreStats",
    "StoredFile",
    "StoredModel",
    "folder_mode",
    "format_bytes",
    "model_files",
    "parse_file_mode",
    "redact_uri",
    "validate_source_uri",
]
