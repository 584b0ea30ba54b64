"""The download engine: ranged parallel parts written in place, retried, resumable, verified.

A model is a list of files; each file is split into parts of ``part_size`` bytes. All parts of
all files go to one pool of ``concurrency`` worker threads. A worker streams its range into a
reused buffer and ``pwrite``s it at its offset in a preallocated file, so memory stays at about
``concurrency x chunk_size`` however large the model. A transient error (reset, timeout, 5xx,
throttling) is retried with exponential backoff and jitter from the byte the part reached.

The sha256 of each file is computed in file order: the part at the hash frontier feeds its
bytes to the hashes from the receive buffer as they arrive (a file of one part is never read
back); parts that completed ahead of the frontier are read back from the page cache once it
reaches them (mapped, not copied), overlapped with the download. Where the source publishes an MD5
(S3 single-part ETag, GCS md5Hash) or a git blob sha1 (Hugging Face) it is folded in the same
pass and checked too, and so is a published sha256 (Hugging Face LFS, OCI digests).

Where the source publishes a CRC (S3 CRC64NVME/CRC32C/CRC32, GCS crc32c) the file is verified
by it instead, and no sha256 or MD5 is computed: each part folds its own CRC as its bytes
arrive (no read-back at all), and the parts' CRCs are joined in file order
(:mod:`nodecache.cache.checksums`); the manifest records that CRC as the file's checksum.
Which checks apply is :class:`~nodecache.cache.filechecks.FileChecks`' decision.

Whatever the check, each part also folds its own xxh3-128 as its bytes arrive (a part kept
from an earlier run is read back once, into the check and its digest together): the file's
local digest (:mod:`nodecache.cache.localdigest`), recorded in the manifest so ``nodecache
verify`` re-checks the disk at memory bandwidth.

Parts that completed are recorded in a :class:`~nodecache.cache.journal.Journal` next to the
partial files, after their bytes were flushed to disk; after a kill the next fetch re-lists
the source and reuses every recorded part of every file whose size and ETag are unchanged.

Disk use is bounded by what is written, not by what the source claims: a file of known size
is preallocated and no part may write past its end; files of unknown size (HTTP without a
Content-Length) draw on a :class:`~nodecache.cache.budget.WriteBudget` before each write, so
an endless source stops at the allowance instead of filling the disk.

The options live in :mod:`nodecache.cache.options` and the retry loop in
:mod:`nodecache.cache.retry`; their names stay importable from here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nodecache.cache.budget import WriteBudget
from nodecache.cache.diskio import MAP_WINDOW, map_range, preallocate, pwrite_all, start_writeback
from nodecache.cache.errors import CacheError, IntegrityError
from nodecache.cache.filechecks import FileChecks
from nodecache.cache.journal import Journal
from nodecache.cache.layout import JOURNAL_NAME
from nodecache.cache.localdigest import LocalDigest, new_hash
from nodecache.cache.options import FetchOptions, MiB
from nodecache.cache.perms import DEFAULT_FILE_MODE, create_file, folder_mode, make_folder
from nodecache.cache.retry import Aborted, backoff_delay, retrying
from nodecache.cache.sources import RemoteFile, Source, translate_error
from nodecache.cache.uri import redact_uri

__all__ = [
    "JOURNAL_NAME",
    "Aborted",
    "FetchOptions",
    "FetchedFile",
    "Journal",
    "Transfer",
    "WriteBudget",
    "backoff_delay",
    "retrying",
]

log = logging.getLogger(__name__)
_WRITEBACK_STEP = 8 * MiB


@dataclass(frozen=True)
class FetchedFile:
    """One file written and verified on disk."""

    path: str
    size: int
    sha256: str | None
    """None when the file was verified by the source's CRC instead (:attr:`checksum`)."""
    checksum: str | None = None
    """``<algorithm>:<hex>`` of the source's CRC the file was verified by, if any."""
    local: LocalDigest | None = None
    """Its fast local digest (one xxh3-128 per part), for ``nodecache verify``."""


@dataclass
class _Part:
    index: int
    start: int
    end: int | None


@dataclass
class _FileJob:
    remote: RemoteFile
    dest: Path
    parts: list[_Part]
    done: list[bool]
    fd: int = -1
    kept: bool = False
    """Parts were kept from an earlier attempt: open without truncating."""
    open_lock: threading.Lock = field(default_factory=threading.Lock)
    written: int = 0
    """Bytes of this file delivered so far (unknown-size files only)."""
    extent: int = 0
    """Highest offset written so far (unknown-size files only: what they hold on disk)."""
    next_hash: int = 0
    """Index of the first part not yet wholly fed to the hashes."""
    hash_pos: int = 0
    """Bytes fed to the hashes so far: always a contiguous prefix of the file."""
    hashing: bool = False
    """Whether a thread is feeding the hashes (one at a time, in file order)."""
    checks: FileChecks = field(default_factory=FileChecks)
    lock: threading.Lock = field(default_factory=threading.Lock)
    unflushed: list[int] = field(default_factory=list)
    finishing: bool = False
    result: FetchedFile | None = None
    read_back: int = 0
    """Bytes hashed by reading them back from the page cache (parts that overtook the
    hash frontier), rather than as they arrived."""


class Transfer:
    """Downloads one listing into one partial folder. All methods are blocking.

    ``on_bytes(n)`` is called from worker threads as bytes land (negative when bytes
    already counted must be fetched again). Files and folders are created with
    ``file_mode`` (folders: :func:`nodecache.cache.perms.folder_mode`); files of unknown
    size draw on ``budget`` before each write that grows them (None: no bound but the disk).
    """

    def __init__(
        self,
        source: Source,
        files: list[RemoteFile],
        folder: Path,
        journal: Journal,
        options: FetchOptions,
        *,
        on_bytes: Callable[[int], None],
        on_retry: Callable[[BaseException, int, float], None] | None = None,
        abort: threading.Event,
        file_mode: int = DEFAULT_FILE_MODE,
        budget: WriteBudget | None = None,
    ) -> None:
        self.source = source
        self.folder = folder
        self.journal = journal
        self.options = options
        self.on_bytes = on_bytes
        self.on_retry = on_retry
        self.abort = abort
        self.file_mode = file_mode
        self.budget = budget
        self.jobs = [self._plan(remote) for remote in files]
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False

    def _plan(self, remote: RemoteFile) -> _FileJob:
        size, step = remote.size, self.options.part_size
        if size is None or not remote.ranges:
            parts = [_Part(0, 0, size)]
        elif size == 0:
            parts = []
        else:
            parts = [_Part(i, s, min(s + step, size)) for i, s in enumerate(range(0, size, step))]
        checks = FileChecks.plan(remote, verify_md5=self.options.verify_md5)
        return _FileJob(
            remote, self.folder / remote.path, parts, [False] * len(parts), checks=checks
        )

    # -- preparing ------------------------------------------------------------------------

    def prepare(self) -> int:
        """Keep the parts the journal vouches for. Files are opened and preallocated by the
        worker that first needs them (:meth:`_open`), in parallel and overlapped with the
        network, instead of one after another before the first byte.

        Returns the number of bytes resumed.
        """
        resumed = 0
        for job in self.jobs:
            remote = job.remote
            kept: set[int] = set()
            if remote.size is not None and remote.ranges:
                kept = self.journal.resumable_parts(remote) & set(range(len(job.parts)))
                if kept and not job.dest.exists():
                    kept = set()
            self.journal.start(remote, kept)
            job.kept = bool(kept)
            for i in sorted(kept):
                job.done[i] = True
                part = job.parts[i]
                resumed += (part.end or 0) - part.start
        return resumed

    def _open(self, job: _FileJob) -> None:
        """Open (truncating unless parts were kept) and preallocate ``job``'s file, once."""
        if job.fd >= 0:
            return
        with job.open_lock:
            if job.fd >= 0:
                return
            if self._closed:
                raise Aborted
            remote = job.remote
            fd = -1
            try:
                make_folder(job.dest.parent, folder_mode(self.file_mode))
                flags = os.O_RDWR | (0 if job.kept else os.O_TRUNC)
                fd = create_file(job.dest, flags, self.file_mode)
                if remote.size:
                    preallocate(fd, remote.size)
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                raise translate_error(exc, self.source.uri, remote.path) from None
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            job.fd = fd

    def pending(self) -> list[tuple[_FileJob, _Part]]:
        return [(j, p) for j in self.jobs for p in j.parts if not j.done[p.index]]

    def start_journal(self) -> None:
        """Start recording progress in the background (call after :meth:`prepare`)."""
        self._flusher = threading.Thread(
            target=self._flush_loop, name="nodecache-journal", daemon=True
        )
        self._flusher.start()

    def close(self) -> None:
        """Stop the journal and close every file. Idempotent; call once workers are done."""
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join()
        if self._closed:
            return
        self._closed = True
        for job in self.jobs:
            with job.open_lock:  # a worker still opening it sees _closed, or is waited for
                if job.fd >= 0:
                    os.close(job.fd)
                    job.fd = -1

    # -- one part -------------------------------------------------------------------------

    def run_part(self, job: _FileJob, part: _Part) -> None:
        """Fetch one part (retrying), then record it and extend the file's hash."""
        if self.abort.is_set():
            raise Aborted
        self._open(job)
        remote = job.remote
        state = {"pos": part.start, "written_back": part.start}
        local = [new_hash()]  # the part's own xxh3-128, folded as its bytes arrive
        fold = job.checks.crc
        crc = fold.for_part(part.start, part.end) if fold and part.end is not None else None
        writeback = self.options.fsync
        # Bytes of a bounded part arrive once each, in order: the part at the hash frontier
        # feeds them to the hashes straight from the receive buffer (no read-back). A part
        # without an end may start over on a retry, so it is hashed after the fact.
        stream = part.end is not None
        budget = self.budget if part.end is None else None

        def sink(offset: int, data: memoryview) -> None:
            if self.abort.is_set():
                raise Aborted
            reach = offset + len(data)
            if part.end is not None and reach > part.end:
                raise IntegrityError(
                    f"{remote.path!r} of {redact_uri(self.source.uri)}: the source sent "
                    f"more than the {remote.size} bytes it announced"
                )
            if budget is not None and reach > job.extent:
                budget.take(reach - job.extent)  # raises before a byte past the allowance
                job.extent = reach
            pwrite_all(job.fd, data, offset)
            local[0].update(data)
            if crc is not None:  # the part's bytes arrive once each, in order
                crc.update(data)
            elif stream and job.hash_pos == offset:
                self._hash_arriving(job, offset, data)
            state["pos"] = pos = offset + len(data)
            if writeback and pos - state["written_back"] >= _WRITEBACK_STEP:
                start_writeback(job.fd, state["written_back"], pos - state["written_back"])
                state["written_back"] = pos
            self.on_bytes(len(data))

        def attempt() -> int:
            if part.end is None and state["pos"] != part.start:
                # No ranges: start over, and un-count what we had.
                self.on_bytes(part.start - state["pos"])
                state["pos"] = part.start
                local[0] = new_hash()
            return self.source.read_range(remote, state["pos"], part.end, sink)

        try:
            end = retrying(attempt, self.options, self.abort, on_retry=self.on_retry)
        except IntegrityError as exc:
            if remote.path in str(exc):
                raise
            where = f"{remote.path!r} of {redact_uri(self.source.uri)}"
            raise IntegrityError(f"{where}: {exc}") from None
        except (Aborted, CacheError):
            raise
        except Exception as exc:
            raise translate_error(exc, self.source.uri, remote.path) from None
        if part.end is None:
            job.written = end
            if remote.size is not None and end != remote.size:
                raise IntegrityError(
                    f"{remote.path!r} of {redact_uri(self.source.uri)}: received {end} bytes, "
                    f"the source says {remote.size}"
                )
        self._complete(job, part, local[0].hexdigest(), crc.values if crc else None)

    def _complete(self, job: _FileJob, part: _Part, local: str, crc: list[int] | None) -> None:
        with job.lock:
            if crc is not None and job.checks.crc is not None:
                job.checks.crc.parts[part.index] = crc
            job.checks.local[part.index] = local
            job.done[part.index] = True
            job.unflushed.append(part.index)
        self.hash_ready(job)

    def _hash_arriving(self, job: _FileJob, offset: int, data: memoryview) -> None:
        """Feed bytes just written at ``offset`` to the hashes if they extend the prefix."""
        with job.lock:
            if job.hashing or job.hash_pos != offset:
                return
            job.hashing = True
        try:
            job.checks.feed(data)
            job.hash_pos = offset + len(data)
        finally:
            with job.lock:
                job.hashing = False
        # No catch-up here: this part is not complete yet, and its completion calls
        # hash_ready, which reads back whatever later parts completed meanwhile.

    def hash_ready(self, job: _FileJob) -> None:
        """Feed every newly contiguous completed part to the file's hashes."""
        with job.lock:
            if job.hashing:
                return
            job.hashing = True
        try:
            while True:
                with job.lock:
                    complete = job.next_hash >= len(job.parts)
                    if complete or not job.done[job.next_hash]:
                        job.hashing = False
                        finish = complete and job.result is None and not job.finishing
                        job.finishing = job.finishing or finish
                        break
                    part = job.parts[job.next_hash]
                self._hash_next(job, part)
                with job.lock:
                    job.next_hash += 1
        except BaseException:
            with job.lock:
                job.hashing = False
            raise
        if finish:  # the whole file is hashed: check and flush it now, in parallel with others
            job.result = self._finish_file(job)

    def _hash_next(self, job: _FileJob, part: _Part) -> None:
        """Extend the file's check with the part at the frontier. A part kept from an
        earlier run is read back once, into the check and its local digest together."""
        end = part.end if part.end is not None else job.written
        checks = job.checks
        local = None if part.index in checks.local else new_hash()

        def also_local(feed: Callable[[memoryview], None]) -> Callable[[memoryview], None]:
            if local is None:
                return feed

            def both(chunk: memoryview) -> None:
                feed(chunk)
                local.update(chunk)

            return both

        if checks.crc is not None:
            checks.crc.join(
                part.index,
                part.start,
                end,
                lambda feed: self._hash_range(job, part.start, end, also_local(feed)),
            )
        elif job.hash_pos < end:  # the part's head may have been hashed as it arrived
            self._hash_range(job, job.hash_pos, end, also_local(checks.feed))
        job.hash_pos = end
        if local is not None:
            checks.local[part.index] = local.hexdigest()

    def _finish_file(self, job: _FileJob) -> FetchedFile:
        remote = job.remote
        size = remote.size if remote.size is not None else job.written
        if os.fstat(job.fd).st_size != size:
            os.ftruncate(job.fd, size)
        failed = job.checks.failure(remote)
        if failed is not None:
            raise self._mismatch(remote, *failed)
        sha256, checksum = job.checks.recorded()
        if self.options.fsync:
            os.fsync(job.fd)
        local = job.checks.local_digest(len(job.parts), self.options.part_size)
        return FetchedFile(remote.path, size, sha256, checksum, local)

    def _mismatch(self, remote: RemoteFile, check: str, got: str, want: str) -> IntegrityError:
        """The file failed ``check``: its parts are forgotten, so the next fetch starts it
        over, and the error says which check and both values."""
        self.journal.forget(remote.path)
        self.journal.save()
        return IntegrityError(
            f"{remote.path!r} of {redact_uri(self.source.uri)}: {check} "
            f"{got} differs from the source's {want}"
        )

    def _hash_range(
        self,
        job: _FileJob,
        start: int,
        end: int,
        feed: Callable[[memoryview], None],
    ) -> None:
        """Feed bytes ``[start, end)`` already on disk to ``feed``, mapped (not copied)
        from the page cache a window at a time."""
        if end <= start:
            return
        if os.fstat(job.fd).st_size < end:  # a mapping past the end would fault (SIGBUS)
            raise IntegrityError(f"{job.remote.path!r}: file shorter than written")
        window = max(self.options.chunk_size, MAP_WINDOW)
        map_range(job.fd, start, end, feed, window=window, abort=self.abort)
        job.read_back += end - start

    def _flush_loop(self) -> None:
        """Background: every ``journal_interval``, flush completed parts and record them."""
        while not self._stop.wait(self.options.journal_interval):
            try:
                self.flush()
            except Exception:
                log.warning("could not update the download journal", exc_info=True)

    def flush(self) -> None:
        """Make completed parts durable, then record them in the journal."""
        for job in self.jobs:
            with job.lock:
                parts, job.unflushed = job.unflushed, []
            if not parts:
                continue
            if self.options.fsync:
                os.fdatasync(job.fd)
            self.journal.record(job.remote.path, parts)
        self.journal.save()

    def read_back_bytes(self) -> dict[str, int]:
        """Per file, the bytes hashed by reading them back from the page cache instead of
        as they arrived: only parts that completed ahead of the hash frontier."""
        return {job.remote.path: job.read_back for job in self.jobs}

    # -- finishing ------------------------------------------------------------------------

    def finish(self) -> list[FetchedFile]:
        """Check every file (size, hashes), flush it, and return what was written."""
        out = []
        for job in self.jobs:
            self._open(job)  # empty files, and files resumed whole, were not opened yet
            self.hash_ready(job)  # files resumed whole have not been hashed yet
            if job.next_hash != len(job.parts):
                raise IntegrityError(f"{job.remote.path!r}: not every part was written")
            if job.result is None:
                job.result = self._finish_file(job)
            out.append(job.result)
        return out
