"""Declarations from a folder of YAML files (standalone mode), watched with watchfiles.

Each call to ``read`` is level-triggered: it lists the whole folder and returns what
should exist now. A file that turns invalid keeps its last good declarations (a typo
must not delete a model from the node) and is reported. Listing costs a ``stat`` per
file; a file is read and parsed again only when it changed, and never on the event loop.

The folder is followed by its path, not its inode: replaced (``mv``, or ``rm -rf`` and
``mkdir``), the new folder is watched and its files are the truth. While the path is
missing the last declarations stay, so a blip in a deployment script deletes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from nodecache.agent.declarations import DeclarationError, ModelDeclaration, parse_declarations

__all__ = ["MAX_FILE_BYTES", "DeclarationFolder", "FolderSnapshot"]

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 1 << 20
# Errors quote at most this much of what a file holds, in status and in logs.
MAX_ERROR_CHARS = 200
# A file whose mtime is this close to the time it was read may change again within the
# filesystem's timestamp granularity without its stat key changing: parse it again next time.
_RACY_NS = 2_000_000_000

# What identifies one version of a file without reading it.
FileKey = tuple[int, int, int, int]  # device, inode, size, mtime in ns


@dataclass
class FolderSnapshot:
    declarations: dict[str, ModelDeclaration] = field(default_factory=dict)
    # model name -> file it came from
    origins: dict[str, str] = field(default_factory=dict)
    # file name -> why it was refused
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class _Parsed:
    key: FileKey | None  # None: parse again next time (changed too recently to trust)
    declarations: list[ModelDeclaration] | None
    error: str | None


class DeclarationFolder:
    def __init__(self, path: Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> None:
        self.path = path
        self.max_file_bytes = max_file_bytes
        self._parsed: dict[str, _Parsed] = {}
        self._last_good: dict[str, list[ModelDeclaration]] = {}
        self._reported: dict[str, str] = {}
        self._owners: dict[str, str] = {}  # model name -> file that declared it last time
        self._last = FolderSnapshot()
        self._unreadable: str | None = None  # why the folder could not be listed last time

    def read(self) -> FolderSnapshot:
        """Every declaration of the folder now; never raises for a bad file or a missing
        folder. Blocking (stat, and reading changed files): call it off the event loop."""
        try:
            files = self._list()
        except (FileNotFoundError, NotADirectoryError):
            return self._folder_unreadable("the declarations folder is missing")
        except OSError as exc:  # no permission, a failing disk
            return self._folder_unreadable(
                f"the declarations folder cannot be read: {exc.strerror}"
            )
        if self._unreadable:
            log.info("declarations folder is back", extra={"folder": str(self.path)})
            self._unreadable = None
        for gone in set(self._parsed) - set(files):
            del self._parsed[gone]
        for gone in set(self._last_good) - set(files):
            del self._last_good[gone]
        snapshot = FolderSnapshot()
        parsed: dict[str, list[ModelDeclaration]] = {}
        for name, key in sorted(files.items()):
            result = self._parse(name, key)
            if result.error is not None:
                snapshot.errors[name] = result.error
                parsed[name] = self._last_good.get(name, [])
            else:
                assert result.declarations is not None
                parsed[name] = self._last_good[name] = result.declarations
        # A name declared twice stays with the file that had it before; a new file
        # cannot take a model away from a running one. Otherwise file order decides.
        owning = set(self._owners.values())
        order = sorted(parsed, key=lambda f: (f not in owning, f))
        for filename in order:
            for decl in parsed[filename]:
                first = snapshot.origins.get(decl.name)
                if first is not None:
                    snapshot.errors[filename] = (
                        f"model '{decl.name}' is already declared in {first}"
                    )
                    continue
                snapshot.declarations[decl.name] = decl
                snapshot.origins[decl.name] = filename
        self._owners = dict(snapshot.origins)
        self._log_changes(snapshot.errors)
        self._last = snapshot
        return snapshot

    def _list(self) -> dict[str, FileKey]:
        """The declaration files and their stat keys: no file is opened."""
        files: dict[str, FileKey] = {}
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not entry.name.endswith(SUFFIXES):
                    continue
                try:
                    st = entry.stat()  # follows links, as ConfigMap mounts use them
                except OSError:  # removed since the listing
                    continue
                if entry.is_file():
                    files[entry.name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return files

    def _parse(self, name: str, key: FileKey) -> _Parsed:
        """The file's declarations, parsed again only if its stat key changed."""
        known = self._parsed.get(name)
        if known is not None and known.key == key:
            return known
        mtime_ns = key[3]
        trusted = abs(time.time_ns() - mtime_ns) > _RACY_NS
        try:
            declarations = parse_declarations(self._text(name, key[2]))
        except (DeclarationError, OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            result = _Parsed(key if trusted else None, None, _excerpt(reason))
        else:
            result = _Parsed(key if trusted else None, declarations, None)
        self._parsed[name] = result
        return result

    def _text(self, name: str, size: int) -> str:
        limit = self.max_file_bytes
        refusal = f"the file is over the {limit} byte limit for a declaration file"
        if size > limit:
            raise DeclarationError(refusal)
        with (self.path / name).open("rb") as f:
            data = f.read(limit + 1)  # it may have grown since it was listed
        if len(data) > limit:
            raise DeclarationError(refusal)
        return data.decode()

    def _folder_unreadable(self, reason: str) -> FolderSnapshot:
        """The last declarations, with why the folder cannot be listed as an error: nothing
        is deleted until a folder is back at the path."""
        if self._unreadable != reason:
            log.warning(
                f"{reason}; keeping the last declarations until it can be read",
                extra={"folder": str(self.path)},
            )
            self._unreadable = reason
        last = self._last
        errors = {**last.errors, str(self.path): reason}
        return FolderSnapshot(dict(last.declarations), dict(last.origins), errors)

    def _log_changes(self, errors: dict[str, str]) -> None:
        for name, reason in errors.items():
            if self._reported.get(name) != reason:
                log.error("invalid declaration file", extra={"file": name, "error": reason})
        for name in set(self._reported) - set(errors):
            log.info("declaration file valid again", extra={"file": name})
        self._reported = dict(errors)

    async def watch(self, rescan: float = 1.0) -> AsyncIterator[FolderSnapshot]:
        """The current snapshot, then a new one after every change to the folder.

        The folder is also listed again every ``rescan`` seconds without events, and a
        snapshot yielded if it differs: a file written between the first read and the
        watcher's start (no event for it, ever) or a change inotify does not report (some
        network filesystems) is picked up within that time.
        """
        last = await asyncio.to_thread(self.read)
        yield last
        async for changes in self._changes(rescan):
            snapshot = await asyncio.to_thread(self.read)
            if changes or snapshot != last:
                last = snapshot
                yield snapshot

    async def _changes(self, rescan: float) -> AsyncIterator[set[tuple[watchfiles.Change, str]]]:
        """The folder's change events, and an empty set every ``rescan`` seconds. inotify
        watches an inode: when another folder takes the path, the watch moves to it."""
        while True:
            watched = _identity(self.path)
            if watched is None:  # missing: look again later
                await asyncio.sleep(rescan)
                yield set()
                continue
            try:
                async with contextlib.aclosing(
                    watchfiles.awatch(
                        self.path,
                        debounce=200,
                        step=50,
                        recursive=False,
                        rust_timeout=int(rescan * 1000),
                        yield_on_timeout=True,
                    )
                ) as events:
                    async for changes in events:
                        yield changes
                        if _identity(self.path) != watched:
                            break
            except OSError:  # gone between the check and the watch's start
                await asyncio.sleep(rescan)
                yield set()


def _identity(path: Path) -> tuple[int, int] | None:
    """The folder now at ``path`` (device, inode), or None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _excerpt(message: str) -> str:
    """At most MAX_ERROR_CHARS of a message: it may quote a file's contents."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return message[: MAX_ERROR_CHARS - 1] + "…"
