"""Download orchestration: one source URI into one partial folder, then published.

:func:`run_download` opens the source, lists it, asks the store for room, runs every part
of every file through a :class:`~nodecache.cache.fetch.Transfer` on a pool of worker
threads, and publishes the result. A failure or a cancellation stops every worker before it
returns; a partial copy is kept for a resume unless the error is permanent. What it needs
from the store (room, publishing, counters) comes in as :class:`StoreHooks`, so this module
knows nothing of the store's index or leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from nodecache.cache.budget import WriteBudget
from nodecache.cache.errors import CacheError, InsufficientSpaceError, SizeLimitError
from nodecache.cache.fetch import FetchedFile, Transfer
from nodecache.cache.fsutil import rmtree
from nodecache.cache.journal import Journal
from nodecache.cache.layout import JOURNAL_NAME
from nodecache.cache.options import FetchOptions
from nodecache.cache.perms import folder_mode, make_folder
from nodecache.cache.quota import allowance, format_bytes, size_rule
from nodecache.cache.retry import ensure_fetch_error, retrying
from nodecache.cache.sources import RemoteFile, Source, open_source
from nodecache.cache.uri import redact_uri

__all__ = ["InFlight", "Progress", "StoreHooks", "call_progress", "run_download", "write_budget"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
"""``progress(done_bytes, total_bytes_or_None)``; may be called from a worker thread."""
T = TypeVar("T")


def call_progress(listener: Progress, done: int, total: int | None) -> None:
    """Tell one listener; a listener that fails is logged, never the download's problem."""
    try:
        listener(done, total)
    except Exception:
        log.exception("progress callback failed; ignoring")


class InFlight:
    """One in-flight download, shared by every caller that asked for the same source."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.waiters = 0
        self.listeners: list[Progress] = []
        self.lock = threading.Lock()
        self.done = 0
        self.total: int | None = None
        self.reserved = 0
        """Bytes the store reserved for it (counted against the quota until it ends)."""

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            done, total, listeners = self.done, self.total, list(self.listeners)
        for listener in listeners:
            call_progress(listener, done, total)


@dataclass(frozen=True)
class StoreHooks(Generic[T]):
    """What a download needs from the store. ``reserve`` and ``publish`` block (they run
    in worker threads); ``on_bytes`` and ``on_retry`` are called from worker threads."""

    reserve: Callable[[int], int]
    """Make room for ``needed`` bytes (evicting what may go) or raise; returns the room the
    download has (at least ``needed``)."""
    publish: Callable[[list[FetchedFile], str | None], T]
    """Publish the verified partial folder, with what the source resolved to
    (:attr:`Source.resolved`)."""
    on_bytes: Callable[[int], None]
    on_retry: Callable[[BaseException, int, float], None]
    limit_bytes: int | None
    """The store's limit (for the message when a source of unknown size outgrows it)."""


@dataclass(frozen=True)
class DownloadSpec:
    """One download: what, where to, and within which bounds."""

    uri: str
    folder: Path
    """The partial folder (``tmp/<key>.partial``), resumed if a journal is there."""
    options: FetchOptions
    file_mode: int
    credentials: Mapping[str, str]
    max_bytes: int | None
    isolated: bool = False
    """A namespaced cache's download: ``credentials`` alone (see ``open_source``)."""


async def run_download(spec: DownloadSpec, inflight: InFlight, hooks: StoreHooks[T]) -> T:
    """Download ``spec`` and publish it through ``hooks``; see the module docstring."""
    run = _Run(spec, inflight, hooks)
    try:
        return await run.go()
    except BaseException as exc:
        error = await run.abort(exc)
        if error is None:
            raise
        raise error from None
    finally:
        await run.close()


def write_budget(
    uri: str, known: int, room: int, max_bytes: int | None, limit_bytes: int | None
) -> WriteBudget:
    """What the files of unknown size may write together: the declared size's allowance or
    the store's room, whichever is smaller, less the files of known size."""
    most = allowance(max_bytes)
    shown = redact_uri(uri)
    if most is not None and most <= room:
        return WriteBudget(
            most - known,
            lambda: SizeLimitError(
                f"{shown}: the source sent more than modelSize {size_rule(max_bytes)} "
                "allows; download stopped and its partial copy removed"
            ),
        )
    if limit_bytes is None:
        where = f"disk full while fetching {shown}: the source sent more than the disk had"
    else:
        where = (
            f"{shown}: the source sent more than the cache had room for (limit "
            f"{format_bytes(limit_bytes)})"
        )
    message = f"{where}, {format_bytes(room)}; download stopped and its partial copy removed"
    return WriteBudget(room - known, lambda: InsufficientSpaceError(message))


class _Run(Generic[T]):
    """The state of one :func:`run_download`: its pool, its workers and what to undo."""

    def __init__(self, spec: DownloadSpec, inflight: InFlight, hooks: StoreHooks[T]) -> None:
        self.spec = spec
        self.inflight = inflight
        self.hooks = hooks
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(
            max_workers=spec.options.concurrency, thread_name_prefix="nodecache"
        )
        self.abort_event = threading.Event()
        self.futures: list[Future[Any]] = []
        self.waiting: list[asyncio.Future[Any]] = []
        self.source: Source | None = None
        self.transfer: Transfer | None = None
        self.room = 0
        """The room the store reserved for this download (set by :meth:`_reserve`)."""

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return self.loop.run_in_executor(self.pool, fn, *args)

    async def go(self) -> T:
        spec, opts = self.spec, self.spec.options
        self.source = source = await self.run(
            lambda: open_source(
                spec.uri,
                chunk_size=opts.chunk_size,
                timeout=opts.timeout,
                credentials=spec.credentials,
                registry_mirrors=opts.registry_mirrors,
                isolated=spec.isolated,
            )
        )
        files: list[RemoteFile] = await self.run(
            functools.partial(
                retrying, source.list_files, opts, self.abort_event, on_retry=self.hooks.on_retry
            )
        )
        budget = await self._reserve(files)
        journal = Journal(spec.folder, spec.uri, opts.part_size, file_mode=spec.file_mode)
        await self.run(self._prepare_partial, journal, files)
        self.transfer = transfer = Transfer(
            source,
            files,
            spec.folder,
            journal,
            opts,
            on_bytes=self.hooks.on_bytes,
            on_retry=self.hooks.on_retry,
            abort=self.abort_event,
            file_mode=spec.file_mode,
            budget=budget,
        )
        await self._transfer(transfer)
        fetched = await self.run(transfer.finish)
        await self.run(transfer.close)
        # Among the futures abort() waits for: no unpacking thread outlives the download.
        unpacking = self.pool.submit(self._unpack, source, fetched)
        self.futures.append(unpacking)
        fetched = await asyncio.wrap_future(unpacking)
        return await self.run(self.hooks.publish, fetched, source.resolved)

    def _unpack(self, source: Source, fetched: list[FetchedFile]) -> list[FetchedFile]:
        """The model's files: the verified fetched ones, or what the source made of them
        (an image's layers unpacked) within the download's allowance."""
        spec = self.spec
        budget = write_budget(spec.uri, 0, self.room, spec.max_bytes, self.hooks.limit_bytes)
        made = source.unpack(
            spec.folder, file_mode=spec.file_mode, budget=budget, abort=self.abort_event
        )
        if made is None:
            return fetched
        return [FetchedFile(f.path, f.size, f.sha256, local=f.local) for f in made]

    async def _reserve(self, files: list[RemoteFile]) -> WriteBudget | None:
        """Check the listing against the declared size and reserve its room in the store;
        files of unknown size get a budget to write into."""
        uri, max_bytes = self.spec.uri, self.spec.max_bytes
        sizes = [f.size for f in files]
        known = sum(s for s in sizes if s is not None)
        total = None if None in sizes else known
        most = allowance(max_bytes)
        if most is not None and known > most:
            raise SizeLimitError(
                f"{redact_uri(uri)} lists {format_bytes(known)}, more than modelSize "
                f"{size_rule(max_bytes)} allows"
            )
        with self.inflight.lock:
            self.inflight.total = total
        # Files of unknown size get the declared size reserved, and may grow into what
        # the store has room for, up to the allowance.
        needed = known if total is not None else max(known, max_bytes or 0)
        room = self.room = await self.run(self.hooks.reserve, needed)
        if total is not None:
            return None
        return write_budget(uri, known, room, max_bytes, self.hooks.limit_bytes)

    def _prepare_partial(self, journal: Journal, files: list[RemoteFile]) -> None:
        """The partial folder, with the journal's parts of files the source still lists."""
        folder = self.spec.folder
        make_folder(folder, folder_mode(self.spec.file_mode))
        journal.load()
        wanted = {f.path for f in files}
        journal.files = {p: e for p, e in journal.files.items() if p in wanted}
        for path in list(folder.rglob("*")):  # files the source no longer lists
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in wanted and rel != JOURNAL_NAME:
                path.unlink()

    async def _transfer(self, transfer: Transfer) -> None:
        """Resume what the journal vouches for and fetch every other part, in parallel."""
        resumed = await self.run(transfer.prepare)
        transfer.start_journal()
        if resumed:
            log.info("resuming %s: %d bytes already on disk", redact_uri(self.spec.uri), resumed)
            self.inflight.add(resumed)
        self.futures = [
            self.pool.submit(transfer.run_part, job, part) for job, part in transfer.pending()
        ]
        if self.futures:
            self.waiting.extend(asyncio.wrap_future(f) for f in self.futures)
            await asyncio.wait(self.waiting, return_when=asyncio.FIRST_EXCEPTION)
            for w in self.waiting:
                await w

    async def abort(self, exc: BaseException) -> CacheError | None:
        """Stop every worker and keep the partial copy unless ``exc`` is permanent.

        Returns the error the caller should see instead of ``exc``, None for ``exc`` itself.
        """
        self.abort_event.set()
        for w in self.waiting:  # their errors are consequences of this one
            w.add_done_callback(_retrieve)
        error = (
            None
            if isinstance(exc, asyncio.CancelledError)
            else ensure_fetch_error(exc, self.spec.uri)
        )
        keep = error is None or (getattr(error, "permanent", True) is False)
        cleanup = self.loop.run_in_executor(
            None, _cleanup, self.futures, self.transfer, None if keep else self.spec.folder
        )
        with contextlib.suppress(Exception):
            await asyncio.shield(cleanup)  # no thread may still write after we return
        return None if error is None or error is exc else error

    async def close(self) -> None:
        if self.source is not None:
            await self.run(self.source.close)
        self.pool.shutdown(wait=False)
        with self.inflight.lock:
            self.inflight.reserved = 0


def _cleanup(futures: list[Future[Any]], transfer: Transfer | None, folder: Path | None) -> None:
    wait_futures(futures)
    if transfer is not None:
        transfer.close()
    if folder is not None:
        rmtree(folder)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
