"""Object stores listed through an fsspec filesystem (s3fs, gcsfs)."""

from __future__ import annotations

import posixpath
from abc import abstractmethod
from typing import Any

from nodecache.cache.sources.base import RemoteFile, Source, finish_listing

__all__ = ["FsspecBucketSource"]


class FsspecBucketSource(Source):
    """An object store listed through fsspec (``self.fs``, ``self.root`` = bucket/key):
    a key that is a prefix is a folder, anything else one object."""

    fs: Any
    root: str

    @staticmethod
    @abstractmethod
    def remote(path: str, info: dict[str, Any]) -> RemoteFile:
        """The :class:`RemoteFile` for one listed object (``info`` as fsspec gives it)."""

    def list_files(self) -> list[RemoteFile]:
        info = self.fs.info(self.root)
        if info.get("type") != "directory":
            return finish_listing([self.remote(posixpath.basename(self.root), info)], self.uri)
        prefix = self.root.rstrip("/") + "/"
        found = self.fs.find(self.root, detail=True)
        files = [
            self.remote(name[len(prefix) :], meta)
            for name, meta in found.items()
            if name.startswith(prefix)
            and not name.endswith("/")
            and meta.get("type", "file") == "file"
        ]
        return finish_listing(files, self.uri)
