"""``http(s)://`` sources: one URL, or a folder listed through its index pages (fsspec's
HTTP filesystem); bytes by blocking ranged GETs (:class:`HttpRanges`)."""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any
from urllib.parse import unquote, urlsplit

from nodecache.cache.errors import FetchError
from nodecache.cache.sources.base import (
    RemoteFile,
    Sink,
    Source,
    finish_listing,
    map_threads,
)
from nodecache.cache.sources.httpclient import HttpRanges
from nodecache.cache.uri import redact_uri

__all__ = ["HttpSource"]

_MAX_HTTP_ENTRIES = 100_000


class HttpSource(Source):
    """``http(s)://``: a URL ending in ``/`` is a folder listed through its index pages."""

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        client_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=self.timeout
        )
        self.fs = HTTPFileSystem(
            skip_instance_cache=True,
            client_kwargs={"timeout": client_timeout, "auto_decompress": False},
            headers={"Accept-Encoding": "identity"},
        )
        self.http = HttpRanges(self.timeout)

    def close(self) -> None:
        self.http.close()
        session = getattr(self.fs, "_session", None)
        if session is not None:
            with contextlib.suppress(Exception):
                self.fs.close_session(self.fs.loop, session)
            self.fs._session = None

    def list_files(self) -> list[RemoteFile]:
        if not self.uri.endswith("/"):
            name = unquote(posixpath.basename(urlsplit(self.uri).path))
            return finish_listing([self._remote(name, self.uri, self._info(self.uri))], self.uri)
        base = self.uri
        files: list[RemoteFile] = []
        folders, seen = [base], {base}
        while folders:
            # Index pages mark folders with a trailing '/' (nginx, Apache) or not at all
            # (aiohttp): an HTML link that itself lists children is a folder too.
            links = []
            for folder in folders:
                for url in self.fs.ls(folder, detail=False):
                    rel = url[len(base) :] if url.startswith(base) else ""
                    if rel and "?" not in rel and "#" not in rel and url not in seen:
                        seen.add(url)
                        links.append(url)
            if len(seen) > _MAX_HTTP_ENTRIES:
                raise FetchError(f"{redact_uri(self.uri)} lists too many entries", permanent=True)
            folders = [u for u in links if u.endswith("/")]
            candidates = [u for u in links if not u.endswith("/")]
            infos = map_threads(self._info, candidates)
            for url, info in zip(candidates, infos, strict=True):
                if info.get("mimetype") == "text/html" and self.fs.ls(url, detail=False):
                    folders.append(url)
                else:
                    files.append(self._remote(unquote(url[len(base) :]), url, info))
        return finish_listing(files, self.uri)

    def _info(self, url: str) -> dict[str, Any]:
        return self.fs.info(url)

    @staticmethod
    def _remote(path: str, url: str, info: dict[str, Any]) -> RemoteFile:
        size = info.get("size")
        etag = info.get("ETag")
        strong = isinstance(etag, str) and not etag.startswith("W/")
        return RemoteFile(
            path,
            url,
            None if size is None else int(size),
            etag=etag.strip('"') if strong else None,
            ranges=info.get("partial", True) and size is not None,
        )

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        # If-Match only where the server gave a strong ETag for a rangeable object.
        etag = remote.etag if remote.ranges else None
        return self.http.get(
            remote.url, start, end, sink, chunk_size=self.chunk_size, etag=etag, size=remote.size
        )
