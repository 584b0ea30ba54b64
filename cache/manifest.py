"""Published models: the manifest a model folder carries, written once and read back.

A model folder only ever appears in ``models/`` through :func:`publish`: one atomic rename of
a fully written, verified and flushed folder, so a reader that finds ``models/<key>/`` with a
manifest (:func:`load_model`) finds a complete model.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nodecache.cache.errors import CacheError
from nodecache.cache.fetch import FetchedFile
from nodecache.cache.fsutil import fsync_dir, rmtree, tree_bytes
from nodecache.cache.layout import (
    DERIVED_DIR,
    JOURNAL_NAME,
    MANIFEST_NAME,
    check_relative_path,
    model_key,
    validate_ref,
)
from nodecache.cache.localdigest import LocalDigest
from nodecache.cache.perms import create_file
from nodecache.cache.sources import translate_error

__all__ = ["MANIFEST_VERSION", "StoredFile", "StoredModel", "load_model", "publish"]

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class StoredFile:
    """One file of a published model."""

    path: str
    """Relative posix path inside the model folder."""
    size: int
    sha256: str | None
    """None when the file was verified by the source's CRC (:attr:`checksum`) instead."""
    checksum: str | None = None
    """``<algorithm>:<hex>`` of the source's CRC the file was verified by, if any."""
    local: LocalDigest | None = None
    """Its fast local digest, recorded at verification (None in manifests written before
    local digests existed): what ``nodecache verify`` re-checks the disk against."""


@dataclass(frozen=True)
class StoredModel:
    """A published, verified model on disk."""

    key: str
    source_uri: str
    path: Path
    files: tuple[StoredFile, ...]
    resolved: str | None = None
    """What the source's reference resolved to when fetched (a commit, a digest), for
    status; None where the URI names the bytes directly."""
    hit: bool = field(default=False, compare=False)
    """True on what :meth:`ModelStore.fetch` returns when the model was already on disk
    (a cache hit: nothing was read from the source), False when this fetch downloaded it
    or waited for a download."""

    @property
    def size_bytes(self) -> int:
        """Bytes of the model's own files, as the source published them."""
        return sum(f.size for f in self.files)

    def disk_bytes(self) -> int:
        """Bytes the model holds on disk now: its files plus what runtimes derived from
        them (read from the disk each time: a worker process may add some at any time)."""
        return self.size_bytes + tree_bytes(self.path / DERIVED_DIR)


def publish(
    uri: str,
    tmp: Path,
    final: Path,
    fetched: list[FetchedFile],
    *,
    file_mode: int,
    fsync: bool,
    resolved: str | None = None,
) -> StoredModel:
    """Write the manifest into ``tmp``, flush, and rename it to ``final``. Blocking.

    When another process published the same model meanwhile, its copy is kept and returned.
    """
    key = final.name
    manifest = {
        "version": MANIFEST_VERSION,
        "key": key,
        "source_uri": uri,
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [_file_entry(f) for f in fetched],
    }
    if resolved:
        manifest["resolved"] = resolved
    try:
        (tmp / JOURNAL_NAME).unlink(missing_ok=True)
        fd = create_file(tmp / MANIFEST_NAME, os.O_WRONLY | os.O_TRUNC, file_mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(manifest, out, indent=1)
            out.write("\n")
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        if fsync:
            for dirpath, _dirs, _files in os.walk(tmp):
                fsync_dir(Path(dirpath))
        try:
            os.rename(tmp, final)
        except OSError:
            existing = load_model(final)
            if existing is None:
                raise
            rmtree(tmp)  # published by someone else meanwhile: keep theirs
            return existing
        if fsync:
            fsync_dir(final.parent)
    except CacheError:
        raise
    except OSError as exc:
        raise translate_error(exc, uri) from None
    files = tuple(StoredFile(f.path, f.size, f.sha256, f.checksum, f.local) for f in fetched)
    return StoredModel(key=key, source_uri=uri, path=final, files=files, resolved=resolved)


def _file_entry(f: FetchedFile) -> dict[str, object]:
    """A file's manifest entry: its sha256, or the source's CRC it was verified by, and
    its local digest (a field older versions ignore: they still load the manifest)."""
    entry: dict[str, object] = {"path": f.path, "size": f.size}
    if f.sha256 is not None:
        entry["sha256"] = f.sha256
    if f.checksum is not None:
        entry["checksum"] = f.checksum
    if f.local is not None:
        entry["local"] = f.local.to_json()
    return entry


def load_model(folder: Path) -> StoredModel | None:
    """Read and check a model folder's manifest; None when it is not an intact model."""
    try:
        with open(folder / MANIFEST_NAME, encoding="utf-8") as f:
            raw = json.load(f)
        uri = validate_ref(raw["source_uri"])
        if model_key(uri) != folder.name:
            return None
        files = []
        for item in raw["files"]:
            path = check_relative_path(str(item["path"]), uri)
            size = int(item["size"])
            digest, checksum = item.get("sha256"), item.get("checksum")
            if not isinstance(digest, str) and not isinstance(checksum, str):
                return None
            st = os.stat(folder / path, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return None
            files.append(
                StoredFile(
                    path,
                    size,
                    digest if isinstance(digest, str) else None,
                    checksum if isinstance(checksum, str) else None,
                    LocalDigest.from_json(item.get("local"), size),
                )
            )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not files:
        return None
    resolved = raw.get("resolved")
    return StoredModel(
        key=folder.name,
        source_uri=uri,
        path=folder,
        files=tuple(files),
        resolved=resolved[:300] if isinstance(resolved, str) else None,
    )
