"""The node's model store: layout on disk, fetch-and-publish, scan, quota, leases, removal.

Layout under ``root`` (the agent's ``--cache-dir``)::

    models/<key>/                        published models, each with its manifest
    models/<key>/.nodecache-manifest.json
    tmp/<key>.partial/                   a download in progress or resumable after a kill
    tmp/<key>.partial/.nodecache-journal.json
    tmp/<anything else>                  folders being deleted; disposable
    locks/<key>.lock                     flock held while a process downloads <key>
    locks/agent.lock                     flock held by the one agent that owns the folder

A model folder only ever appears in ``models/`` through one atomic rename of a fully written,
verified and flushed folder, so a reader that finds ``models/<key>/`` with a manifest finds a
complete model. The manifest's modification time records the model's last use (LRU order
survives restarts).

Every file the store creates has the store's ``file_mode`` (0640 by default) and every folder
the matching search bits (0750), set explicitly whatever the umask (:mod:`nodecache.cache.perms`).
A download never writes more than the model's declared size allows (``max_bytes`` plus
:data:`MODEL_SIZE_TOLERANCE`) nor more than the store has room for, whatever the source
claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodecache.cache.errors import (
    CacheDirInUseError,
    CacheError,
    InsufficientSpaceError,
    ModelInUseError,
    SizeLimitError,
)
from nodecache.cache.fetch import (
    JOURNAL_NAME,
    FetchedFile,
    FetchOptions,
    Journal,
    Transfer,
    WriteBudget,
    ensure_fetch_error,
    retrying,
)
from nodecache.cache.layout import DERIVED_DIR, MANIFEST_NAME, check_relative_path
from nodecache.cache.perms import (
    DEFAULT_FILE_MODE,
    check_file_mode,
    create_file,
    folder_mode,
    make_folder,
    restrict,
)
from nodecache.cache.sources import (
    RemoteFile,
    Source,
    mask_secrets,
    open_source,
    translate_error,
)
from nodecache.cache.uri import redact_uri, validate_source_uri

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

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes_or_None)``; may be called from a worker thread."""

MANIFEST_VERSION = 1
PARTIAL_SUFFIX = ".partial"
PARTIAL_MAX_AGE = 3 * 24 * 3600.0
MODEL_SIZE_TOLERANCE = 0.25
"""How far past its declared size (``modelSize``) a model may go: declarations are often
rounded ("500Mi" for a 510 MiB model), so a quarter more is allowed; past that the download
stops and the partial copy is removed."""
AGENT_LOCK_NAME = "agent.lock"
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
        """Bytes of the model's own files, as the source published them."""
        return sum(f.size for f in self.files)

    def disk_bytes(self) -> int:
        """Bytes the model holds on disk now: its files plus what runtimes derived from
        them (read from the disk each time: a worker process may add some at any time)."""
        return self.size_bytes + _tree_bytes(self.path / DERIVED_DIR)


@dataclass
class StoreStats:
    """Counters for metrics; read them, never write them."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    evictions: int = 0
    fetches_failed: int = 0
    fetches: int = 0
    """Downloads completed and published (``fetch_seconds`` keeps only the last 1000, so
    a metrics exporter needs this count to tell which durations are new)."""
    fetch_seconds: list[float] = field(default_factory=list)
    """Durations of completed downloads (the last 1000)."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Download:
    """One in-flight download, shared by every caller that asked for the same source."""

    def __init__(self) -> None:
        self.task: asyncio.Task[StoredModel] | None = None
        self.waiters = 0
        self.listeners: list[Progress] = []
        self.lock = threading.Lock()
        self.done = 0
        self.total: int | None = None
        self.reserved = 0

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
        _make_root(self.root, self.folder_mode)
        for folder in (self.models_dir, self.tmp_dir, self.locks_dir):
            make_folder(folder, self.folder_mode)
        self.stats = StoreStats()
        self._index: dict[str, StoredModel] = {}
        self._index_loaded = False
        self._downloads: dict[str, _Download] = {}
        self._leases: dict[str, int] = {}
        self._protected: frozenset[str] = frozenset()
        self._space_lock = threading.Lock()
        self._stats_lock = threading.Lock()

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
        """Bytes held: published models (their files) plus partial downloads on disk."""
        self._ensure_index()
        published = sum(m.disk_bytes() for m in self._index.values())
        return published + sum(self._partial_bytes().values())

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
        now = time.time()
        for entry in _listdir(self.tmp_dir):
            key = entry.name[: -len(PARTIAL_SUFFIX)] if entry.name.endswith(PARTIAL_SUFFIX) else ""
            if not key:
                _rmtree(entry)  # a folder being deleted
                continue
            if key in self._downloads:
                continue
            with contextlib.suppress(OSError):
                if now - (entry / JOURNAL_NAME).stat().st_mtime < PARTIAL_MAX_AGE:
                    continue
            with self._download_lock_if_free(key) as free:
                if free:
                    _rmtree(entry)
        if tighten:
            for folder in (self.models_dir, self.tmp_dir, self.locks_dir):
                restrict(folder, self.file_mode)
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

    async def fetch(
        self,
        source_uri: str,
        *,
        progress: Progress | None = None,
        credentials: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
    ) -> StoredModel:
        """Return the model for ``source_uri``, downloading and publishing it if needed.

        A cache hit returns at once without touching the network. Concurrent calls for the
        same source share one download; cancelling one caller leaves the download running
        for the others, and it stops when the last caller goes away. A download stopped by
        cancellation or a transient error leaves its verified parts on disk, and the next
        fetch of the same source resumes from them.

        ``credentials`` (resolved by the caller from a Secret or credentials file; see
        :func:`nodecache.cache.sources.open_source` for the names) override the environment. Their
        values never appear in errors or logs.

        ``max_bytes`` is the model's declared size (``modelSize``): a source that lists, or
        sends, more than it plus :data:`MODEL_SIZE_TOLERANCE` fails with
        :class:`SizeLimitError` and leaves nothing on disk. Callers that join a download
        already running share its bound.
        """
        uri = validate_source_uri(source_uri)
        key = self.key_for(uri)
        hit = self.lookup(uri)
        if hit is not None:
            self.stats.hits += 1
            self.touch(hit)
            if progress is not None:
                _call_progress(progress, hit.size_bytes, hit.size_bytes)
            return hit
        download = self._downloads.get(key)
        if download is None:
            self.stats.misses += 1
            download = _Download()
            self._downloads[key] = download
            download.task = asyncio.create_task(
                self._download(uri, key, download, dict(credentials or {}), max_bytes)
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

    def _forget(self, key: str, download: _Download) -> None:
        if self._downloads.get(key) is download:
            del self._downloads[key]
        task = download.task
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # mark retrieved: every waiter has seen or abandoned it

    async def _download(
        self,
        uri: str,
        key: str,
        download: _Download,
        credentials: dict[str, str],
        max_bytes: int | None,
    ) -> StoredModel:
        lock_fd = await self._acquire_lock(key)
        try:
            hit = self.lookup(uri)  # another process may have published it meanwhile
            if hit is not None:
                return hit
            started = time.monotonic()
            try:
                model = await self._transfer(uri, key, download, credentials, max_bytes)
            except CacheError as exc:
                self.stats.fetches_failed += 1
                raise mask_secrets(exc, credentials) from None
            except BaseException:
                self.stats.fetches_failed += 1
                raise
            self.stats.fetch_seconds = [
                *self.stats.fetch_seconds[-999:],
                time.monotonic() - started,
            ]
            self.stats.fetches += 1
            return model
        finally:
            os.close(lock_fd)

    async def _acquire_lock(self, key: str) -> int:
        fd = create_file(self.locks_dir / f"{key}.lock", os.O_RDWR, self.file_mode)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    await asyncio.sleep(0.2)
        except BaseException:
            os.close(fd)
            raise

    @contextlib.contextmanager
    def _download_lock_if_free(self, key: str) -> Iterator[bool]:
        """Take ``key``'s download lock without waiting. Yields True while it is held here
        (no process can start or resume that download meanwhile, so its partial may go),
        False when a download holds it (in another process, or in this one)."""
        fd = create_file(self.locks_dir / f"{key}.lock", os.O_RDWR, self.file_mode)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)  # closing drops our lock, if we got it

    async def _transfer(
        self,
        uri: str,
        key: str,
        download: _Download,
        credentials: dict[str, str],
        max_bytes: int | None,
    ) -> StoredModel:
        loop = asyncio.get_running_loop()
        opts = self.options
        pool = ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="nodecache")
        abort = threading.Event()
        futures: list[Future[Any]] = []
        waiting: list[asyncio.Future[Any]] = []
        source: Source | None = None
        transfer: Transfer | None = None
        folder = self.tmp_dir / f"{key}{PARTIAL_SUFFIX}"

        def run(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(pool, fn, *args)

        def on_retry(exc: BaseException, attempt: int, delay: float) -> None:
            with self._stats_lock:
                self.stats.retries += 1
            log.info(
                "retrying %s in %.1fs (attempt %d): %s",
                redact_uri(uri),
                delay,
                attempt,
                mask_secrets(translate_error(exc, uri), credentials),
            )

        def on_bytes(n: int) -> None:
            if n > 0:
                with self._stats_lock:  # worker threads: += alone can lose updates
                    self.stats.bytes_fetched += n
            download.add(n)

        try:
            source = await run(
                lambda: open_source(
                    uri, chunk_size=opts.chunk_size, timeout=opts.timeout, credentials=credentials
                )
            )
            files: list[RemoteFile] = await run(
                functools.partial(retrying, source.list_files, opts, abort, on_retry=on_retry)
            )
            sizes = [f.size for f in files]
            known = sum(s for s in sizes if s is not None)
            total = None if None in sizes else known
            allowance = _allowance(max_bytes)
            if allowance is not None and known > allowance:
                raise SizeLimitError(
                    f"{redact_uri(uri)} lists {format_bytes(known)}, more than modelSize "
                    f"{_size_rule(max_bytes)} allows"
                )
            with download.lock:
                download.total = total
            # Files of unknown size get the declared size reserved, and may grow into what
            # the store has room for, up to the allowance.
            needed = known if total is not None else max(known, max_bytes or 0)
            room = await run(self._make_room, uri, key, needed, download)
            budget = None if total is not None else self._budget(uri, known, room, max_bytes)
            journal = Journal(folder, uri, opts.part_size, file_mode=self.file_mode)
            await run(self._prepare_partial, folder, journal, files)
            transfer = Transfer(
                source,
                files,
                folder,
                journal,
                opts,
                on_bytes=on_bytes,
                on_retry=on_retry,
                abort=abort,
                file_mode=self.file_mode,
                budget=budget,
            )
            resumed = await run(transfer.prepare)
            transfer.start_journal()
            if resumed:
                log.info("resuming %s: %d bytes already on disk", redact_uri(uri), resumed)
                download.add(resumed)
            futures = [
                pool.submit(transfer.run_part, job, part) for job, part in transfer.pending()
            ]
            if futures:
                waiting.extend(asyncio.wrap_future(f) for f in futures)
                await asyncio.wait(waiting, return_when=asyncio.FIRST_EXCEPTION)
                for w in waiting:
                    await w
            fetched = await run(transfer.finish)
            await run(transfer.close)
            model = await run(self._publish, uri, key, folder, fetched)
        except BaseException as exc:
            abort.set()
            for w in waiting:  # their errors are consequences of this one
                w.add_done_callback(_retrieve)
            error = (
                None if isinstance(exc, asyncio.CancelledError) else ensure_fetch_error(exc, uri)
            )
            keep = error is None or (getattr(error, "permanent", True) is False)
            cleanup = loop.run_in_executor(
                None, self._cleanup, futures, transfer, None if keep else folder
            )
            with contextlib.suppress(Exception):
                await asyncio.shield(cleanup)  # no thread may still write after we return
            if error is None or error is exc:
                raise
            raise error from None
        finally:
            if source is not None:
                await run(source.close)
            pool.shutdown(wait=False)
            with download.lock:
                download.reserved = 0
        self._index[key] = model
        log.info("published %s as %s (%d bytes)", redact_uri(uri), key, model.size_bytes)
        return model

    @staticmethod
    def _cleanup(
        futures: list[Future[Any]], transfer: Transfer | None, folder: Path | None
    ) -> None:
        wait_futures(futures)
        if transfer is not None:
            transfer.close()
        if folder is not None:
            _rmtree(folder)

    def _budget(self, uri: str, known: int, room: int, max_bytes: int | None) -> WriteBudget:
        """What the files of unknown size may write together: the declared size's
        allowance or the store's room, whichever is smaller, less the files of known size."""
        allowance = _allowance(max_bytes)
        shown = redact_uri(uri)
        if allowance is not None and allowance <= room:
            return WriteBudget(
                allowance - known,
                lambda: SizeLimitError(
                    f"{shown}: the source sent more than modelSize {_size_rule(max_bytes)} "
                    "allows; download stopped and its partial copy removed"
                ),
            )
        if self.limit_bytes is None:
            where = f"disk full while fetching {shown}: the source sent more than the disk had"
        else:
            where = (
                f"{shown}: the source sent more than the cache had room for (limit "
                f"{format_bytes(self.limit_bytes)})"
            )
        message = f"{where}, {format_bytes(room)}; download stopped and its partial copy removed"
        return WriteBudget(room - known, lambda: InsufficientSpaceError(message))

    def _prepare_partial(self, folder: Path, journal: Journal, files: list[RemoteFile]) -> None:
        make_folder(folder, self.folder_mode)
        journal.load()
        wanted = {f.path for f in files}
        journal.files = {p: e for p, e in journal.files.items() if p in wanted}
        for path in list(folder.rglob("*")):  # files the source no longer lists
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in wanted and rel != JOURNAL_NAME:
                path.unlink()

    def _publish(self, uri: str, key: str, tmp: Path, fetched: list[FetchedFile]) -> StoredModel:
        """Write the manifest, flush, and rename ``tmp`` into ``models/<key>``. Blocking."""
        manifest = {
            "version": MANIFEST_VERSION,
            "key": key,
            "source_uri": uri,
            "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in fetched],
        }
        try:
            (tmp / JOURNAL_NAME).unlink(missing_ok=True)
            fd = create_file(tmp / MANIFEST_NAME, os.O_WRONLY | os.O_TRUNC, self.file_mode)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
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
                _rmtree(tmp)  # published by someone else meanwhile: keep theirs
                return existing
            if self.options.fsync:
                _fsync_dir(self.models_dir)
        except CacheError:
            raise
        except OSError as exc:
            raise translate_error(exc, uri) from None
        files = tuple(StoredFile(f.path, f.size, f.sha256) for f in fetched)
        return StoredModel(key=key, source_uri=uri, path=final, files=files)

    # ---- quota ----------------------------------------------------------------------------

    def _make_room(self, uri: str, key: str, needed: int, download: _Download) -> int:
        """Reserve ``needed`` bytes for ``key``, evicting LRU models; refuse if impossible.

        Returns the room this download has (at least ``needed``): what a source of unknown
        size may write at most.
        """
        with self._space_lock:
            self._ensure_index()
            partials = self._partial_bytes()
            own = partials.pop(key, 0)
            # Partials of downloads in flight are preallocated: counted here and on the disk.
            # One of unknown size holds its reservation even before its bytes arrive.
            for other, running in list(self._downloads.items()):
                if other != key and running.reserved:
                    partials[other] = max(partials.get(other, 0), running.reserved)
            published = sum(m.disk_bytes() for m in self._index.values())
            disk_free = shutil.disk_usage(self.root).free + own
            if self.limit_bytes is None:
                free = disk_free
                limit_text = "none"
            else:
                used = published + sum(partials.values())
                free = min(self.limit_bytes - used, disk_free)
                limit_text = format_bytes(self.limit_bytes)
            candidates = self._eviction_candidates()
            evictable = sum(m.disk_bytes() for m in candidates)
            idle_partials = {k: n for k, n in partials.items() if k not in self._downloads}
            evictable += sum(idle_partials.values())
            if needed > free + evictable:
                raise InsufficientSpaceError(
                    f"{redact_uri(uri)} needs {format_bytes(needed)}, limit {limit_text}, "
                    f"free {format_bytes(max(free, 0))}"
                    + (f" (+{format_bytes(evictable)} evictable)" if evictable else ""),
                    needed=needed,
                )
            for pkey in sorted(idle_partials):
                if needed <= free:
                    break
                with self._download_lock_if_free(pkey) as idle:
                    if idle:
                        _rmtree(self.tmp_dir / f"{pkey}{PARTIAL_SUFFIX}")
                        free += idle_partials[pkey]
            for model in candidates:
                if needed <= free:
                    break
                held = model.disk_bytes()
                log.info("evicting %s (%d bytes) to make room", model.key, held)
                if self._discard(model.path):
                    self.stats.evictions += 1
                    free += held
                self._index.pop(model.key, None)
            if needed > free:
                raise InsufficientSpaceError(
                    f"{redact_uri(uri)} needs {format_bytes(needed)}, limit {limit_text}, "
                    f"free {format_bytes(max(free, 0))}",
                    needed=needed,
                )
            download.reserved = needed
            return free

    def _eviction_candidates(self) -> list[StoredModel]:
        """Published models that are not protected and not in use, least recently used first."""
        models = [
            m
            for m in self._index.values()
            if m.key not in self._protected and not self._leases.get(m.key)
        ]
        return sorted(models, key=lambda m: (self.last_used(m), m.key))

    def _partial_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in _listdir(self.tmp_dir):
            if entry.name.endswith(PARTIAL_SUFFIX) and entry.is_dir():
                key = entry.name[: -len(PARTIAL_SUFFIX)]
                out[key] = _tree_bytes(entry)
        return out

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
                    _rmtree(self.tmp_dir / f"{key}{PARTIAL_SUFFIX}")
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
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    return None
                files.append(StoredFile(path, size, digest))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not files:
            return None
        return StoredModel(key=folder.name, source_uri=uri, path=folder, files=tuple(files))


class CacheDirLock:
    """The agent's claim on its cache folder: an exclusive ``flock`` on ``locks/agent.lock``,
    held until :meth:`release` or the process ends (a kill releases it too).

    A second agent on the same folder would delete the first one's models at start (its
    clean-up and garbage collection take them for its own leftovers), so it is refused.
    ``nodecache prefetch`` does not take this lock: it shares the folder with a running
    agent by design and coordinates with it per download (``locks/<key>.lock``).
    """

    def __init__(self, root: Path, *, file_mode: int = DEFAULT_FILE_MODE) -> None:
        self.root = Path(root)
        locks = self.root / "locks"
        _make_root(self.root, folder_mode(check_file_mode(file_mode)))
        make_folder(locks, folder_mode(file_mode))
        fd = create_file(locks / AGENT_LOCK_NAME, os.O_RDWR, file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise CacheDirInUseError(
                f"cache dir {self.root} is in use by another agent ({who})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _make_root(root: Path, mode: int) -> None:
    """The cache dir with ``mode`` if it is missing; folders above it as the umask makes
    them (the standalone socket folder may live in the same parent: not ours to close)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    make_folder(root, mode)


def _allowance(max_bytes: int | None) -> int | None:
    """The most a model declared as ``max_bytes`` may take on disk."""
    return None if max_bytes is None else int(max_bytes * (1 + MODEL_SIZE_TOLERANCE))


def _size_rule(max_bytes: int | None) -> str:
    """``'64.0 MiB (80.0 MiB with the 25% tolerance)'``, for error messages."""
    allowance = _allowance(max_bytes) or 0
    return (
        f"{format_bytes(max_bytes or 0)} ({format_bytes(allowance)} with the "
        f"{MODEL_SIZE_TOLERANCE:.0%} tolerance)"
    )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def _tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


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
