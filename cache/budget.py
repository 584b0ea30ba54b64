"""The disk allowance shared by the files of unknown size of one download.

A file of known size is preallocated and bounded by its size; a file without one (HTTP
without a Content-Length) could stream forever, so every write that grows it first takes
its bytes from one :class:`WriteBudget`, and the download stops at the allowance instead of
filling the disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from nodecache.cache.errors import CacheError

__all__ = ["WriteBudget"]


class WriteBudget:
    """Bytes the files of unknown size of one download may still take on disk, together.

    Taken before each write that grows such a file, so a source that streams without a
    Content-Length (or forever) stops at the allowance instead of filling the disk.
    ``error()`` builds the error raised when a write would go past ``limit``.
    """

    def __init__(self, limit: int, error: Callable[[], CacheError]) -> None:
        self.limit = max(0, limit)
        self.used = 0
        self._error = error
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise self._error()
            self.used += n
