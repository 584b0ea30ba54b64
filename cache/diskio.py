"""The disk side of a download and of ``nodecache verify``: positioned writes, preallocation,
early writeback, and reading a byte range back mapped from the page cache (no copy)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable

from nodecache.cache.errors import InsufficientSpaceError
from nodecache.cache.options import MiB
from nodecache.cache.retry import Aborted

__all__ = ["MAP_WINDOW", "map_range", "preallocate", "pwrite_all", "start_writeback"]

MAP_WINDOW = 16 * MiB
"""Bytes mapped at a time when reading a range back from the page cache."""
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+length)`` to disk now, without
    waiting. Parts written back while later ones download leave little for the fsync
    before publish to wait for (1 GiB of dirty pages is ~1 s of NVMe time at the end)."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes so a full disk fails now, not half way through."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise InsufficientSpaceError(
                f"not enough disk space for a {size}-byte file", needed=size
            ) from None
        os.ftruncate(fd, max(size, os.fstat(fd).st_size))  # no fallocate on this filesystem


def map_range(
    fd: int,
    start: int,
    end: int,
    feed: Callable[[memoryview], None],
    *,
    window: int = MAP_WINDOW,
    abort: threading.Event | None = None,
) -> None:
    """Feed bytes ``[start, end)`` of ``fd`` to ``feed``, mapped (not copied) from the page
    cache ``window`` bytes at a time. The caller checks that the file is long enough: a
    mapping past its end faults (SIGBUS)."""
    pos = start
    while pos < end:
        if abort is not None and abort.is_set():
            raise Aborted
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        stop = min(end, base + window)
        with mmap.mmap(fd, stop - base, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=base) as m:
            view = memoryview(m)
            try:
                chunk = view[pos - base : stop - base]
                try:
                    feed(chunk)
                finally:
                    chunk.release()
            finally:
                view.release()
        pos = stop
