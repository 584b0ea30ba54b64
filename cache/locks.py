"""Locks on the cache folder: the agent's claim on it, and one lock file per download.

Processes sharing one cache folder (the agent and a ``nodecache prefetch`` init container)
coordinate through ``flock`` on files under ``locks/``: a kill releases them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from nodecache.cache.errors import CacheDirInUseError
from nodecache.cache.fsutil import make_root
from nodecache.cache.perms import (
    DEFAULT_FILE_MODE,
    check_file_mode,
    create_file,
    folder_mode,
    make_folder,
)

__all__ = ["AGENT_LOCK_NAME", "CacheDirLock", "acquire_download_lock", "download_lock_if_free"]

AGENT_LOCK_NAME = "agent.lock"


async def acquire_download_lock(path: Path, file_mode: int) -> int:
    """Wait for the exclusive lock on ``path`` (``locks/<key>.lock``); returns its fd,
    whose closing releases it."""
    fd = create_file(path, os.O_RDWR, file_mode)
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
def download_lock_if_free(path: Path, file_mode: int) -> Iterator[bool]:
    """Take a download lock without waiting. Yields True while it is held here (no process
    can start or resume that download meanwhile, so its partial may go), False when a
    download holds it (in another process, or in this one)."""
    fd = create_file(path, os.O_RDWR, file_mode)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # closing drops our lock, if we got it


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
        make_root(self.root, folder_mode(check_file_mode(file_mode)))
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
