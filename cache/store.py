"""The node's model store: index, leases, fetch, quota and removal over the layout on disk.

Layout under ``root`` (the agent's ``--cache-dir``)::

    models/<key>/                        published models, each with its manifest
    models/<key>/.nodecache-manifest.json
    tmp/<key>.partial/                   a download in progress or resumable after a kill
    tmp/<key>.partial/.nodecache-journal.json
    tmp/<anything else>                  folders being deleted; disposable
    locks/<key>.lock                     flock held while a process downloads <key>
    locks/agent.lock                     flock held by the one agent that owns the folder

A model folder only ever appears in ``models/`` through one atomic rename of a fully written,
verified and flushed folder (:mod:`nodecache.cache.manifest`), so a reader that finds
``models/<key>/`` with a manifest finds a complete model. The manifest's modification time
records the model's last use (LRU order survives restarts). Downloads run in
:mod:`nodecache.cache.download`; room is made by :mod:`nodecache.cache.room`, over what the
pure :func:`nodecache.cache.quota.plan_room` decides must go.

Every file the store creates has the store's ``file_mode`` (0640 by default) and every folder
the matching search bits (0750), set explicitly whatever the umask (:mod:`nodecache.cache.perms`).
A download never writes more than the model's declared size allows (``max_bytes`` plus
:data:`MODEL_SIZE_TOLERANCE`) nor more than the store has room for, whatever the source
claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from nodecache.cache.download import (
    DownloadSpec,
    InFlight,
    Progress,
    StoreHooks,
    call_progress,
    run_download,
)
from nodecache.cache.errors import CacheError, ModelInUseError
from nodecache.cache.fetch import FetchedFile
from nodecache.cache.fsutil import listdir, make_root, rmtree
from nodecache.cache.layout import MANIFEST_NAME, model_key, split_scope, validate_ref
from nodecache.cache.locks import CacheDirLock, acquire_download_lock, download_lock_if_free
from nodecache.cache.manifest import StoredFile, StoredModel, load_model, publish
from nodecache.cache.options import FetchOptions
from nodecache.cache.perms import (
    DEFAULT_FILE_MODE,
    check_file_mode,
    folder_mode,
    make_folder,
    restrict,
)
from nodecache.cache.quota import MODEL_SIZE_TOLERANCE, Held, format_bytes
from nodecache.cache.room import PARTIAL_SUFFIX, make_room, partial_bytes, room_left, sweep_tmp
from nodecache.cache.sources import mask_secrets, translate_error
from nodecache.cache.stats import StoreStats
from nodecache.cache.uri import redact_uri
from nodecache.cache.verify import Verdict, drop_corrupt

__all__ = [
    "MODEL_SIZE_TOLERANCE",
    "CacheDirLock",
    "ModelStore",
    "Progress",
    "StoreStats",
    "StoredFile",
    "StoredModel",
    "format_bytes",
]

log = logging.getLogger(__name__)


class ModelStore:
    """Models on node-local disk, keyed by source URI.

    ``limit_bytes`` bounds what the store may hold (published models plus partial
    downloads); None means "whatever the disk has". ``file_mode`` is the mode of every file
    the store creates (folders get the matching search bits; see :mod:`nodecache.cache.perms`).
    Processes sharing one ``root`` (the agent and a ``nodecache prefetch`` init container)
    coordinate through lock files: one downloads, the other waits and then finds the
    published model.
    """

    def __init__(
        self,
        root: Path,
        *,
        options: FetchOptions | None = None,
        limit_bytes: int | None = None,
        file_mode: int = DEFAULT_FILE_MODE,
    ) -> None:
        self.root = Path(root)
        self.options = options or FetchOptions()
        self.limit_bytes = limit_bytes
        self.file_mode = check_file_mode(file_mode)
        self.folder_mode = folder_mode(file_mode)
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        make_root(self.root, self.folder_mode)
        for folder in (self.models_dir, self.tmp_dir, self.locks_dir):
            make_folder(folder, self.folder_mode)
        self.stats = StoreStats()
        self._index: dict[str, StoredModel] = {}
        self._index_loaded = False
        self._downloads: dict[str, InFlight] = {}
        self._leases: dict[str, int] = {}
        self._protected: frozenset[str] = frozenset()
        self._space_lock = threading.Lock()
        self._stats_lock = threading.Lock()

    # ---- keys and lookups -------------------------------------------------------------

    @staticmethod
    def key_for(source_uri: str) -> str:
        """Folder name for ``source_uri`` (:func:`nodecache.cache.layout.model_key`)."""
        return model_key(source_uri)

    def lookup(self, source_uri: str) -> StoredModel | None:
        """The published model for ``source_uri``, or None. Reads no network."""
        key = self.key_for(source_uri)
        model = self._index.get(key)
        if model is not None and model.path.is_dir():
            return model
        model = load_model(self.models_dir / key)
        if model is None:
            self._index.pop(key, None)
        else:
            self._index[key] = model
        return model

    def used_bytes(self) -> int:
        """Bytes held: published models (their files) plus partial downloads on disk."""
        self._ensure_index()
        published = sum(m.disk_bytes() for m in self._index.values())
        return published + sum(partial_bytes(self.tmp_dir).values())

    def models(self) -> list[StoredModel]:
        """Every published model, sorted by key."""
        self._ensure_index()
        return sorted(self._index.values(), key=lambda m: m.key)

    # ---- use, protection, LRU ---------------------------------------------------------

    @contextlib.contextmanager
    def use(self, source_uri: str) -> Iterator[StoredModel]:
        """Hold the published model for ``source_uri`` while reading or serving it.

        A held model is never evicted, and :meth:`remove` refuses it. Raises
        :class:`KeyError` when the model is not on disk.
        """
        model = self.lookup(source_uri)
        if model is None:
            raise KeyError(f"{redact_uri(source_uri)} is not in the cache")
        self._leases[model.key] = self._leases.get(model.key, 0) + 1
        self.touch(model)
        try:
            yield model
        finally:
            left = self._leases[model.key] - 1
            if left:
                self._leases[model.key] = left
            else:
                del self._leases[model.key]

    def in_use(self, source_uri: str) -> bool:
        return self._leases.get(self.key_for(source_uri), 0) > 0

    def protect(self, source_uris: Iterable[str]) -> None:
        """Replace the set of sources eviction must keep (declared or pinned models)."""
        self._protected = frozenset(self.key_for(u) for u in source_uris)

    def touch(self, model: StoredModel) -> None:
        """Record a use of ``model`` now (LRU order)."""
        with contextlib.suppress(OSError):
            os.utime(model.path / MANIFEST_NAME)

    def last_used(self, model: StoredModel) -> float:
        try:
            return os.stat(model.path / MANIFEST_NAME).st_mtime
        except OSError:
            return 0.0

    # ---- startup scan -----------------------------------------------------------------

    def scan(self, *, tighten: bool = True) -> list[StoredModel]:
        """Clean up after a crash and return the intact models.

        Deletes every model folder whose manifest is missing or unreadable, or whose files
        are missing or differ in size from the manifest, and everything under ``tmp/``
        except resumable partial downloads (a journal, younger than three days) and those
        another process is downloading right now (a partial is deleted only while this
        process holds its download lock, so no download can start on it meanwhile).

        With ``tighten`` (the agent, which owns the folder's policy), every permission bit
        ``file_mode`` does not give is taken away from the store's folders and published
        models, so copies written before the policy existed follow it too. A prefetch
        shares the folder with an agent and leaves that to it.
        """
        sweep_tmp(self.tmp_dir, self._downloads, self._download_lock_if_free)
        if tighten:
            for folder in (self.models_dir, self.tmp_dir, self.locks_dir):
                restrict(folder, self.file_mode)
        index: dict[str, StoredModel] = {}
        for entry in listdir(self.models_dir):
            model = load_model(entry) if entry.is_dir() and not entry.is_symlink() else None
            if model is None:
                log.warning("removing damaged or unknown entry %s from the cache", entry)
                self._discard(entry)
                continue
            index[model.key] = model
        self._index = index
        self._index_loaded = True
        return sorted(index.values(), key=lambda m: m.key)

    def drop_corrupt(self, threads: int | None = None) -> list[Verdict]:
        """Re-hash every published model against its local digest (blocking) and remove
        each one whose bytes changed on disk, so it is fetched again, never served."""
        self._ensure_index()

        def drop(model: StoredModel) -> None:
            self._index.pop(model.key, None)
            self._discard(model.path)

        return drop_corrupt(sorted(self._index.values(), key=lambda m: m.key), drop, threads)

    # ---- fetch --------------------------------------------------------------------------

    async def fetch(
        self,
        source_uri: str,
        *,
        progress: Progress | None = None,
        credentials: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
        isolated: bool = False,
    ) -> StoredModel:
        """Return the model for ``source_uri``, downloading and publishing it if needed.

        A cache hit returns at once without touching the network, with
        :attr:`StoredModel.hit` set. Concurrent calls for the same source share one
        download; cancelling one caller leaves the download running for the others, and it
        stops when the last caller goes away. A download stopped by cancellation or a
        transient error leaves its verified parts on disk, and the next fetch of the same
        source resumes from them.

        ``credentials`` (resolved by the caller from a Secret or credentials file; see
        :func:`nodecache.cache.sources.open_source` for the names) override the environment;
        ``isolated`` (a namespaced cache) uses them alone. Their values never appear in
        errors or logs. A fetch that joins a download in flight, or hits a copy on disk, gets
        bytes some earlier fetch of the same name made: a namespaced cache's name is scoped
        to its namespace (:func:`~nodecache.cache.layout.scoped`), so that earlier fetch was
        its own namespace's.

        ``max_bytes`` is the model's declared size (``modelSize``): a source that lists, or
        sends, more than it plus :data:`MODEL_SIZE_TOLERANCE` fails with
        :class:`SizeLimitError` and leaves nothing on disk. Callers that join a download
        already running share its bound.
        """
        uri = validate_ref(source_uri)
        key = self.key_for(uri)
        hit = self.lookup(uri)
        if hit is not None:
            self.stats.hits += 1
            self.touch(hit)
            if progress is not None:
                call_progress(progress, hit.size_bytes, hit.size_bytes)
            return dataclasses.replace(hit, hit=True)
        download = self._downloads.get(key)
        if download is None:
            self.stats.misses += 1
            download = InFlight()
            self._downloads[key] = download
            download.task = asyncio.create_task(
                self._download(uri, key, download, dict(credentials or {}), max_bytes, isolated)
            )
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

    def _forget(self, key: str, download: InFlight) -> None:
        if self._downloads.get(key) is download:
            del self._downloads[key]
        task = download.task
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # mark retrieved: every waiter has seen or abandoned it

    async def _download(
        self,
        uri: str,
        key: str,
        download: InFlight,
        credentials: dict[str, str],
        max_bytes: int | None,
        isolated: bool,
    ) -> StoredModel:
        lock_fd = await acquire_download_lock(self._lock_path(key), self.file_mode)
        try:
            hit = self.lookup(uri)  # another process may have published it meanwhile
            if hit is not None:
                return hit
            started = time.monotonic()
            spec = DownloadSpec(
                uri=split_scope(uri)[0],
                folder=self.tmp_dir / f"{key}{PARTIAL_SUFFIX}",
                options=self.options,
                file_mode=self.file_mode,
                credentials=credentials,
                max_bytes=max_bytes,
                isolated=isolated,
            )
            try:
                hooks = self._hooks(uri, key, download, credentials)  # publishes as ``uri``
                model = await run_download(spec, download, hooks)
            except CacheError as exc:
                self.stats.fetches_failed += 1
                raise mask_secrets(exc, credentials) from None
            except BaseException:
                self.stats.fetches_failed += 1
                raise
            self._index[key] = model
            log.info(
                "published %s as %s (%d bytes)",
                redact_uri(split_scope(uri)[0]),
                key,
                model.size_bytes,
            )
            self.stats.fetch_seconds = [
                *self.stats.fetch_seconds[-999:],
                time.monotonic() - started,
            ]
            self.stats.fetches += 1
            return model
        finally:
            os.close(lock_fd)

    def _hooks(
        self, uri: str, key: str, download: InFlight, credentials: Mapping[str, str]
    ) -> StoreHooks[StoredModel]:
        """What one download of ``uri`` needs from the store: room, publishing, counters."""
        source_uri = split_scope(uri)[0]

        def on_retry(exc: BaseException, attempt: int, delay: float) -> None:
            with self._stats_lock:
                self.stats.retries += 1
            log.info(
                "retrying %s in %.1fs (attempt %d): %s",
                redact_uri(source_uri),
                delay,
                attempt,
                mask_secrets(translate_error(exc, source_uri), credentials),
            )

        def on_bytes(n: int) -> None:
            if n > 0:
                with self._stats_lock:  # worker threads: += alone can lose updates
                    self.stats.bytes_fetched += n
            download.add(n)

        def publish_here(fetched: list[FetchedFile], resolved: str | None) -> StoredModel:
            return publish(
                uri,
                self.tmp_dir / f"{key}{PARTIAL_SUFFIX}",
                self.models_dir / key,
                fetched,
                file_mode=self.file_mode,
                fsync=self.options.fsync,
                resolved=resolved,
            )

        return StoreHooks(
            reserve=lambda needed: self._make_room(uri, key, needed, download),
            publish=publish_here,
            on_bytes=on_bytes,
            on_retry=on_retry,
            limit_bytes=self.limit_bytes,
        )

    def _lock_path(self, key: str) -> Path:
        return self.locks_dir / f"{key}.lock"

    @contextlib.contextmanager
    def _download_lock_if_free(self, key: str) -> Iterator[bool]:
        with download_lock_if_free(self._lock_path(key), self.file_mode) as free:
            yield free

    # ---- quota ----------------------------------------------------------------------------

    def _make_room(self, uri: str, key: str, needed: int, download: InFlight) -> int:
        """Reserve ``needed`` bytes for ``key``, evicting LRU models; refuse if impossible.

        Returns the room this download has (at least ``needed``): what a source of unknown
        size may write at most.
        """
        with self._space_lock:
            self._ensure_index()
            partials = partial_bytes(self.tmp_dir)
            own = partials.pop(key, 0)
            # Partials of downloads in flight are preallocated: counted here and on the disk.
            # One of unknown size holds its reservation even before its bytes arrive.
            for other, running in list(self._downloads.items()):
                if other != key and running.reserved:
                    partials[other] = max(partials.get(other, 0), running.reserved)
            published = sum(m.disk_bytes() for m in self._index.values())
            disk_free = shutil.disk_usage(self.root).free + own
            room = room_left(self.limit_bytes, published, partials, disk_free)
            idle = {k: n for k, n in partials.items() if k not in self._downloads}
            models = {m.key: m for m in self._eviction_candidates()}
            held = [Held(k, m.disk_bytes()) for k, m in models.items()]
            free = make_room(
                uri, needed, room, idle, held, lambda v: self._evict(v, models.get(v.key))
            )
            download.reserved = needed
            return free

    def _evict(self, victim: Held, model: StoredModel | None) -> int:
        """Remove one victim of :func:`plan_room`; returns the bytes freed (0 if it could
        not go: a partial another process resumed, a folder that could not be renamed)."""
        if victim.partial:
            with self._download_lock_if_free(victim.key) as free:
                if not free:
                    return 0
                rmtree(self.tmp_dir / f"{victim.key}{PARTIAL_SUFFIX}")
                return victim.bytes
        assert model is not None
        log.info("evicting %s (%d bytes) to make room", model.key, victim.bytes)
        self._index.pop(model.key, None)
        if self._discard(model.path):
            self.stats.evictions += 1
            return victim.bytes
        return 0

    def _eviction_candidates(self) -> list[StoredModel]:
        """Published models that are not protected and not in use, least recently used first."""
        models = [
            m
            for m in self._index.values()
            if m.key not in self._protected and not self._leases.get(m.key)
        ]
        return sorted(models, key=lambda m: (self.last_used(m), m.key))

    # ---- removal ------------------------------------------------------------------------

    def remove(self, source_uri: str) -> bool:
        """Delete the published model (and any partial download) for ``source_uri``.

        Returns True if a published model existed. The folder leaves ``models/`` with one
        atomic rename first, so no reader ever sees a half-deleted model. Raises
        :class:`ModelInUseError` while the model is held through :meth:`use`. A download in
        flight for the same source is not stopped (cancel its fetch first).
        """
        key = self.key_for(source_uri)
        if self._leases.get(key):
            raise ModelInUseError(f"{redact_uri(source_uri)} is in use; release it first")
        self._index.pop(key, None)
        if key not in self._downloads:
            with self._download_lock_if_free(key) as idle:
                if idle:
                    rmtree(self.tmp_dir / f"{key}{PARTIAL_SUFFIX}")
        folder = self.models_dir / key
        if not folder.exists():
            return False
        return self._discard(folder)

    def _discard(self, entry: Path) -> bool:
        trash = self.tmp_dir / f"{entry.name}.removed.{os.urandom(4).hex()}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return False
        rmtree(trash)
        return True

    # ---- index ------------------------------------------------------------------------

    def _ensure_index(self) -> None:
        if self._index_loaded:
            return
        for entry in listdir(self.models_dir):
            model = load_model(entry)
            if model is not None:
                self._index[model.key] = model
        self._index_loaded = True
