"""The node's model store: layout on disk, fetch-and-publish, scan, lookup, removal.

Layout under ``root`` (the agent's ``--cache-dir``)::

    models/<key>/                 published models, each with its manifest
    models/<key>/.nodecache-manifest.json
    tmp/<key>.<random>/           partial downloads and folders being deleted

A model folder only ever appears in ``models/`` through one atomic rename of a fully written,
verified and fsynced folder, so a reader that finds ``models/<key>/`` with a manifest finds a
complete model. Everything under ``tmp/`` is disposable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cache.errors import CacheError
from cache.fetch import (
    MANIFEST_NAME,
    FetchedFile,
    FetchOptions,
    Source,
    check_relative_path,
    download_file,
    open_source,
    translate_error,
)
from cache.uri import redact_uri, validate_source_uri

__all__ = ["ModelStore", "Progress", "StoredFile", "StoredModel"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes_or_None)``; may be called from a worker thread."""

MANIFEST_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class StoredFile:
    """One file of a published model."""

    path: str
    """Relative posix path inside the model folder."""
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredModel:
    """A published, verified model on disk."""

    key: str
    source_uri: str
    path: Path
    files: tuple[StoredFile, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


class _Download:
    """One in-flight download, shared by every caller that asked for the same source."""

    def __init__(self) -> None:
        self.task: asyncio.Task[StoredModel] | None = None
        self.waiters = 0
        self.listeners: list[Progress] = []
        self.lock = threading.Lock()
        self.done = 0
        self.total: int | None = None
        self.tmp: Path | None = None

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            done, total, listeners = self.done, self.total, list(self.listeners)
        for listener in listeners:
            _call_progress(listener, done, total)


def _call_progress(listener: Progress, done: int, total: int | None) -> None:
    try:
        listener(done, total)
    except Exception:
        log.exception("progress callback failed; ignoring")


class ModelStore:
    """Models on node-local disk, keyed by source URI.

    Not safe to share one ``root`` between processes yet beyond what atomic renames give:
    two processes fetching the same source both download, and the second rename loses.
    """

    def __init__(self, root: Path, *, options: FetchOptions | None = None) -> None:
        self.root = Path(root)
        self.options = options or FetchOptions()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, StoredModel] = {}
        self._index_loaded = False
        self._downloads: dict[str, _Download] = {}

    # ---- keys and lookups -------------------------------------------------------------

    @staticmethod
    def key_for(source_uri: str) -> str:
        """Folder name for ``source_uri``: a readable tail plus a hash of the normalised URI.

        Stable across restarts and versions; equal sources (after normalisation) share a key.
        """
        uri = validate_source_uri(source_uri)
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        tail = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        readable = _UNSAFE.sub("_", tail).strip("._-")[:48]
        return f"{readable}-{digest}" if readable else digest

    def lookup(self, source_uri: str) -> StoredModel | None:
        """The published model for ``source_uri``, or None. Reads no network."""
        key = self.key_for(source_uri)
        model = self._index.get(key)
        if model is not None and model.path.is_dir():
            return model
        model = self._load(self.models_dir / key)
        if model is None:
            self._index.pop(key, None)
        else:
            self._index[key] = model
        return model

    def used_bytes(self) -> int:
        """Bytes held by published models (their files; manifests not counted)."""
        self._ensure_index()
        return sum(m.size_bytes for m in self._index.values())

    def models(self) -> list[StoredModel]:
        """Every published model, sorted by key."""
        self._ensure_index()
        return sorted(self._index.values(), key=lambda m: m.key)

    # ---- startup scan -----------------------------------------------------------------

    def scan(self) -> list[StoredModel]:
        """Clean up after a crash and return the intact models.

        Deletes every partial under ``tmp/`` (except those of downloads running in this
        store) and every model folder whose manifest is missing or unreadable, or whose
        files are missing or differ in size from the manifest.
        """
        active = {d.tmp.name for d in self._downloads.values() if d.tmp is not None}
        for entry in _listdir(self.tmp_dir):
            if entry.name not in active:
                _rmtree(entry)
        index: dict[str, StoredModel] = {}
        for entry in _listdir(self.models_dir):
            model = self._load(entry) if entry.is_dir() and not entry.is_symlink() else None
            if model is None:
                log.warning("removing damaged or unknown entry %s from the cache", entry)
                self._discard(entry)
                continue
            index[model.key] = model
        self._index = index
        self._index_loaded = True
        return sorted(index.values(), key=lambda m: m.key)

    # ---- fetch --------------------------------------------------------------------------

    async def fetch(self, source_uri: str, *, progress: Progress | None = None) -> StoredModel:
        """Return the model for ``source_uri``, downloading and publishing it if needed.

        A cache hit returns at once without touching the network. Concurrent calls for the
        same source share one download; cancelling one caller leaves the download running
        for the others, and it stops when the last caller goes away.
        """
        uri = validate_source_uri(source_uri)
        key = self.key_for(uri)
        hit = self.lookup(uri)
        if hit is not None:
            if progress is not None:
                _call_progress(progress, hit.size_bytes, hit.size_bytes)
            return hit
        download = self._downloads.get(key)
        if download is None:
            download = _Download()
            self._downloads[key] = download
            download.task = asyncio.create_task(self._download(uri, key, download))
            download.task.add_done_callback(lambda _t: self._forget(key, download))
        if progress is not None:
            with download.lock:
                download.listeners.append(progress)
        download.waiters += 1
        task = download.task
        assert task is not None
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            download.waiters -= 1
            if download.waiters == 0 and not task.done():
                # Nobody wants it any more: stop it, and let a later fetch start afresh
                # instead of joining a download that is being torn down.
                self._forget(key, download)
                task.cancel()
            raise
        finally:
            if progress is not None:
                with download.lock, contextlib.suppress(ValueError):
                    download.listeners.remove(progress)

    def _forget(self, key: str, download: _Download) -> None:
        if self._downloads.get(key) is download:
            del self._downloads[key]
        task = download.task
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # mark retrieved: every waiter has seen or abandoned it

    async def _download(self, uri: str, key: str, download: _Download) -> StoredModel:
        loop = asyncio.get_running_loop()
        opts = self.options
        pool = ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="nodecache")
        abort = threading.Event()
        futures: list[Future[Any]] = []
        source: Source | None = None
        try:
            source = await loop.run_in_executor(pool, open_source, uri, opts)
            remote_files = await loop.run_in_executor(pool, source.list_files)
            sizes = [f.size for f in remote_files]
            total = None if None in sizes else sum(s for s in sizes if s is not None)
            with download.lock:
                download.total = total
            tmp = self.tmp_dir / f"{key}.{secrets.token_hex(4)}"
            download.tmp = tmp
            await loop.run_in_executor(pool, tmp.mkdir)
            for remote in remote_files:
                futures.append(
                    pool.submit(
                        download_file, source, remote, tmp, on_bytes=download.add, abort=abort
                    )
                )
            waiting = [asyncio.wrap_future(f) for f in futures]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_EXCEPTION)
            fetched: list[FetchedFile] = [await w for w in waiting]
            model = await loop.run_in_executor(pool, self._publish, uri, key, tmp, fetched)
        except BaseException as exc:
            abort.set()
            cleanup = loop.run_in_executor(None, self._cleanup, futures, download.tmp)
            # Finish the cleanup even if we are being cancelled: no partial may stay behind.
            with contextlib.suppress(Exception):
                await asyncio.shield(cleanup)
            if isinstance(exc, Exception) and not isinstance(exc, CacheError):
                raise translate_error(exc, uri) from None
            raise
        finally:
            if source is not None:
                await loop.run_in_executor(pool, source.close)
            pool.shutdown(wait=False)
        self._index[key] = model
        log.info("published %s as %s (%d bytes)", redact_uri(uri), key, model.size_bytes)
        return model

    @staticmethod
    def _cleanup(futures: list[Future[Any]], tmp: Path | None) -> None:
        wait_futures(futures)
        if tmp is not None:
            _rmtree(tmp)

    def _publish(self, uri: str, key: str, tmp: Path, fetched: list[FetchedFile]) -> StoredModel:
        """Write the manifest, flush, and rename ``tmp`` into ``models/<key>``. Blocking."""
        manifest = {
            "version": MANIFEST_VERSION,
            "key": key,
            "source_uri": uri,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in fetched],
        }
        manifest_path = tmp / MANIFEST_NAME
        try:
            with open(manifest_path, "w", encoding="utf-8") as out:
                json.dump(manifest, out, indent=1)
                out.write("\n")
                out.flush()
                if self.options.fsync:
                    os.fsync(out.fileno())
            if self.options.fsync:
                for dirpath, _dirs, _files in os.walk(tmp):
                    _fsync_dir(Path(dirpath))
            final = self.models_dir / key
            try:
                os.rename(tmp, final)
            except OSError:
                existing = self._load(final)
                if existing is None:
                    raise
                # Another process published the same source meanwhile: keep theirs.
                _rmtree(tmp)
                return existing
            if self.options.fsync:
                _fsync_dir(self.models_dir)
        except CacheError:
            raise
        except OSError as exc:
            raise translate_error(exc, uri) from None
        files = tuple(StoredFile(f.path, f.size, f.sha256) for f in fetched)
        return StoredModel(key=key, source_uri=uri, path=final, files=files)

    # ---- removal ------------------------------------------------------------------------

    def remove(self, source_uri: str) -> bool:
        """Delete the published model for ``source_uri``; True if there was one.

        The folder leaves ``models/`` with one atomic rename first, so no reader ever sees
        a half-deleted model. A download in flight for the same source is not stopped.
        """
        key = self.key_for(source_uri)
        self._index.pop(key, None)
        folder = self.models_dir / key
        if not folder.exists():
            return False
        return self._discard(folder)

    def _discard(self, entry: Path) -> bool:
        trash = self.tmp_dir / f"{entry.name}.removed.{secrets.token_hex(4)}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return False
        _rmtree(trash)
        return True

    # ---- manifests ----------------------------------------------------------------------

    def _ensure_index(self) -> None:
        if self._index_loaded:
            return
        for entry in _listdir(self.models_dir):
            model = self._load(entry)
            if model is not None:
                self._index[model.key] = model
        self._index_loaded = True

    def _load(self, folder: Path) -> StoredModel | None:
        """Read and check a model folder's manifest; None when it is not an intact model."""
        try:
            with open(folder / MANIFEST_NAME, encoding="utf-8") as f:
                raw = json.load(f)
            uri = validate_source_uri(raw["source_uri"])
            if self.key_for(uri) != folder.name:
                return None
            files = []
            for item in raw["files"]:
                path = check_relative_path(str(item["path"]), uri)
                size, digest = int(item["size"]), str(item["sha256"])
                st = os.stat(folder / path, follow_symlinks=False)
                if not _is_regular(st.st_mode) or st.st_size != size:
                    return None
                files.append(StoredFile(path, size, digest))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not files:
            return None
        return StoredModel(key=folder.name, source_uri=uri, path=folder, files=tuple(files))


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _rmtree(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        log.warning("could not remove %s", path, exc_info=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
