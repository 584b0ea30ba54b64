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
    "scoped",
    "split_scope",
    "validate_ref",
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
_SCOPE_PREFIX = "nodecache-scope:"
_SCOPE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a namespace's name


def scoped(source_uri: str, scope: str | None) -> str:
    """The store's name for ``source_uri`` fetched for ``scope`` (a namespace), or for the
    cluster (None). Bytes are shared only within one scope: a namespaced cache may point
    its source's endpoint anywhere, so what it fetches for a URI must never be what
    another scope gets for that URI, nor the other way round."""
    if scope is None:
        return source_uri
    if not _SCOPE.fullmatch(scope):
        raise FetchError(f"scope {scope[:64]!r} is not a namespace name", permanent=True)
    return f"{_SCOPE_PREFIX}{scope}:{source_uri}"


def split_scope(ref: str) -> tuple[str, str | None]:
    """``(source_uri, scope)`` of a name :func:`scoped` made (scope None for the cluster)."""
    if not ref.startswith(_SCOPE_PREFIX):
        return ref, None
    scope, _, uri = ref[len(_SCOPE_PREFIX) :].partition(":")
    return uri, scope


def validate_ref(ref: str) -> str:
    """:func:`validate_source_uri` for a scoped name: the URI normalised, the scope kept."""
    uri, scope = split_scope(ref)
    return scoped(validate_source_uri(uri), scope)


def model_key(source_uri: str) -> str:
    """Folder name for ``source_uri``: a readable tail plus a hash of the normalised URI
    (and of its scope, for a :func:`scoped` name).

    Stable across restarts and versions; equal sources (after normalisation) share a key
    within one scope, never across scopes.
    """
    ref = validate_ref(source_uri)
    uri, _ = split_scope(ref)
    digest = hashlib.sha256(ref.encode()).hexdigest()[:16]
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
