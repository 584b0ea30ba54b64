"""Names inside a model folder, and which paths a model's own files may take.

One place for what belongs to nodecache in a model folder (the manifest, the journal of a
partial download, the folder of files a runtime derived from the model's own), so the store,
the fetcher and the runtimes agree on it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from nodecache.cache.errors import FetchError
from nodecache.cache.uri import redact_uri, validate_source_uri

__all__ = [
    "DERIVED_DIR",
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "RESERVED_PREFIX",
    "check_relative_path",
    "model_files",
    "model_key",
]

RESERVED_PREFIX = ".nodecache-"
"""Names starting with this at the top of a model folder belong to nodecache."""
MANIFEST_NAME = RESERVED_PREFIX + "manifest.json"
"""Name of the manifest inside a model folder; never one of the model's files."""
DERIVED_DIR = RESERVED_PREFIX + "derived"
"""Folder inside a model folder for files built from the model's own (a runtime's
faster-loading copy): removed with the model and counted against the store's limit."""
JOURNAL_NAME = RESERVED_PREFIX + "journal.json"
"""Name of the journal inside a partial download's folder."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model_key(source_uri: str) -> str:
    """Folder name for ``source_uri``: a readable tail plus a hash of the normalised URI.

    Stable across restarts and versions; equal sources (after normalisation) share a key.
    """
    uri = validate_source_uri(source_uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    tail = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    readable = _UNSAFE.sub("_", tail).strip("._-")[:48]
    return f"{readable}-{digest}" if readable else digest


def check_relative_path(path: str, source: str) -> str:
    """Return ``path`` if it is a safe relative path inside a model folder, else raise.

    Refuses absolute paths, empty, ``.`` and ``..`` segments, NUL bytes and backslashes, and
    top-level names reserved for nodecache.
    """
    segments = path.split("/")
    bad = (
        not path
        or path.startswith("/")
        or "\x00" in path
        or "\\" in path
        or any(s in ("", ".", "..") for s in segments)
        or segments[0].startswith(RESERVED_PREFIX)
    )
    if bad:
        raise FetchError(
            f"refusing object {path!r} of {redact_uri(source)}: "
            "its path would escape the model folder or clash with nodecache's own files",
            permanent=True,
        )
    return path


def model_files(folder: Path, pattern: str = "*") -> list[Path]:
    """Files of the model in ``folder`` matching ``pattern`` (recursively), sorted; what a
    runtime derived from them (:data:`DERIVED_DIR`) is not the model's own."""
    derived = folder / DERIVED_DIR
    return sorted(p for p in folder.rglob(pattern) if p.is_file() and derived not in p.parents)
