"""Small filesystem helpers the store's modules share (listing, sizes, removal, fsync)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from nodecache.cache.perms import make_folder

__all__ = ["fsync_dir", "listdir", "make_root", "rmtree", "tree_bytes"]

log = logging.getLogger(__name__)


def make_root(root: Path, mode: int) -> None:
    """The cache dir with ``mode`` if it is missing; folders above it as the umask makes
    them (the standalone socket folder may live in the same parent: not ours to close)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    make_folder(root, mode)


def listdir(folder: Path) -> list[Path]:
    """Entries of ``folder``, sorted; none when it does not exist."""
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (symlinks counted as links, not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def rmtree(path: Path) -> None:
    """Remove a file or a folder, logging (not raising) what could not go."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        log.warning("could not remove %s", path, exc_info=True)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
