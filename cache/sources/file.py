"""``file://`` sources: a local folder or a single file, read with ``preadv``."""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Any

from nodecache.cache.errors import FetchError
from nodecache.cache.sources.base import RemoteFile, Sink, Source, finish_listing, thread_buffer

__all__ = ["LocalSource"]


class LocalSource(Source):
    """``file://``: a folder (walked; symlinks may not leave it) or a single file."""

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.root = uri[len("file://") :]

    def list_files(self) -> list[RemoteFile]:
        root = self.root
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise FetchError(f"{self.uri} does not exist", permanent=True) from None
        except PermissionError:
            raise FetchError(f"{self.uri}: permission denied", permanent=True) from None
        if stat.S_ISREG(st.st_mode):
            single = RemoteFile(posixpath.basename(root), root, st.st_size)
            return finish_listing([single], self.uri)
        if not stat.S_ISDIR(st.st_mode):
            raise FetchError(f"{self.uri} is neither a file nor a folder", permanent=True)
        real_root = os.path.realpath(root)
        files: list[RemoteFile] = []

        def fail(err: OSError) -> None:
            raise err

        for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
            for name in dirnames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    rel = os.path.relpath(full, root)
                    raise FetchError(
                        f"refusing symlinked folder {rel!r} in {self.uri}", permanent=True
                    )
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if os.path.islink(full):
                    target = os.path.realpath(full)
                    if os.path.commonpath([real_root, target]) != real_root:
                        raise FetchError(
                            f"refusing symlink {rel!r} in {self.uri}: it points outside the folder",
                            permanent=True,
                        )
                fst = os.stat(full)
                if not stat.S_ISREG(fst.st_mode):
                    raise FetchError(
                        f"refusing {rel!r} in {self.uri}: not a regular file", permanent=True
                    )
                files.append(RemoteFile(rel, full, fst.st_size))
        return finish_listing(files, self.uri)

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        buf = thread_buffer(self.chunk_size)
        fd = os.open(remote.url, os.O_RDONLY)
        try:
            pos = start
            while end is None or pos < end:
                want = self.chunk_size if end is None else min(self.chunk_size, end - pos)
                n = os.preadv(fd, [buf[:want]], pos)
                if n == 0:
                    break
                sink(pos, buf[:n])
                pos += n
            return pos
        finally:
            os.close(fd)
