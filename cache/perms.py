"""Who may read the cache: the modes of the files and folders the disk tier creates.

The agent runs as root and a cached copy may come from a private source: a copy must never be
more readable than the operator's policy (``--cache-mode``, files 0640 and folders 0750 by
default), whatever the process umask or the source's own modes. Every file and folder the
store creates gets its mode set explicitly right after creation, so a umask can neither
loosen nor tighten it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "DEFAULT_FILE_MODE",
    "check_file_mode",
    "create_file",
    "folder_mode",
    "make_folder",
    "parse_file_mode",
    "restrict",
]

DEFAULT_FILE_MODE = 0o640
"""Owner reads and writes, the group reads, others nothing."""


def folder_mode(file_mode: int) -> int:
    """Folders holding files of ``file_mode``: the same bits, plus x wherever r is set
    (0640 -> 0750, 0644 -> 0755, 0600 -> 0700)."""
    mode = file_mode
    for read, search in ((0o400, 0o100), (0o040, 0o010), (0o004, 0o001)):
        if file_mode & read:
            mode |= search
    return mode


def check_file_mode(mode: int) -> int:
    """Return ``mode`` if it is a valid cache file mode, else raise :class:`ValueError`.

    Only read and write bits (no execute, setuid or sticky bits: model files are data), and
    the owner must read and write (the agent writes the copies it serves).
    """
    if mode & ~0o666:
        raise ValueError(f"{mode:04o}: only read and write bits (0666 at most) are allowed")
    if mode & 0o600 != 0o600:
        raise ValueError(f"{mode:04o}: the owner must be able to read and write (0600)")
    return mode


def parse_file_mode(text: str) -> int:
    """``'0640'``, ``'640'`` or ``'0o640'`` -> ``0o640``; raises :class:`ValueError`."""
    digits = text.strip().lower().removeprefix("0o")
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits):
        raise ValueError(f"{text!r} is not an octal file mode such as 0640")
    return check_file_mode(int(digits, 8))


def make_folder(path: Path, mode: int) -> None:
    """Create ``path`` and its missing parents, each with exactly ``mode``. Existing folders
    are left as they are (the cache dir itself may be a hostPath someone else made)."""
    missing: list[Path] = []
    current = Path(path)
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made by another process meanwhile, with its own policy
        os.chmod(folder, mode)


def create_file(path: Path, flags: int, mode: int) -> int:
    """``os.open`` with ``O_CREAT`` whose result has exactly ``mode``, umask or not (an
    existing file, left by an older version, is brought to ``mode`` too)."""
    fd = os.open(path, flags | os.O_CREAT, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def restrict(path: Path, file_mode: int) -> None:
    """Take away from ``path`` and everything under it any bit the policy does not give
    (files: ``file_mode``; folders: :func:`folder_mode`). Never adds a bit, never follows a
    symlink. For copies written before the policy existed, or under a looser one."""
    dir_mode = folder_mode(file_mode)
    for dirpath, _dirnames, filenames in os.walk(path):
        _restrict_one(dirpath, dir_mode)
        for name in filenames:
            _restrict_one(os.path.join(dirpath, name), file_mode)


def _restrict_one(path: str, allowed: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    current = stat.S_IMODE(st.st_mode)
    if current & ~allowed:
        try:
            os.chmod(path, current & allowed)
        except FileNotFoundError:
            return
