"""Blocking ranged GETs over per-thread keep-alive connections, straight into a reused buffer.

The byte path of the ``http(s)``, ``s3`` and ``gs`` sources: it avoids fsspec's single
event-loop thread, so each worker thread streams its part with one request of its own.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

from nodecache.cache.errors import IntegrityError
from nodecache.cache.sources.base import Sink, thread_buffer
from nodecache.cache.sources.errors import SourceHttpError, parse_http_error

__all__ = ["HttpRanges", "endpoint"]

_MAX_REDIRECTS = 5


class _Connections(threading.local):
    def __init__(self) -> None:
        self.pool: dict[tuple[str, str, int], http.client.HTTPConnection] = {}


class HttpRanges:
    """Blocking ranged GETs over per-thread keep-alive connections."""

    def __init__(self, timeout: float, *, cafile: str | None = None) -> None:
        self.timeout = timeout
        self.local = _Connections()
        self.cafile = cafile
        self._ssl: ssl.SSLContext | None = None
        self.lock = threading.Lock()
        self.all: list[http.client.HTTPConnection] = []

    @property
    def ssl(self) -> ssl.SSLContext:
        """The TLS context, made on first use (loading CA certificates costs ~20 ms)."""
        with self.lock:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self.cafile)
            return self._ssl

    def _connection(self, scheme: str, host: str, port: int) -> tuple[Any, bool]:
        key = (scheme, host, port)
        conn = self.local.pool.get(key)
        if conn is not None:
            return conn, True
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        self.local.pool[key] = conn
        with self.lock:
            self.all.append(conn)
        return conn, False

    def _drop(self, scheme: str, host: str, port: int) -> None:
        conn = self.local.pool.pop((scheme, host, port), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self.lock:
            conns, self.all = self.all, []
        for conn in conns:
            conn.close()

    def get(
        self,
        url: str,
        start: int,
        end: int | None,
        sink: Sink,
        *,
        chunk_size: int,
        etag: str | None = None,
        sign: Callable[[str, str], dict[str, str]] | None = None,
        size: int | None = None,
    ) -> int:
        """Ranged GET of ``url`` into ``sink``; ``sign(method, url)`` adds signing headers.

        Signing headers (and so every credential) go only to the origin (scheme, host,
        port) of ``url``: a redirect to another origin, such as a CDN or whatever a hostile
        endpoint names, is followed unsigned, and so is every hop after it. Same-origin hops
        are signed again for their own path. ``size`` is the object's size as listed: bytes
        past it are an error.
        """
        headers = {"Accept-Encoding": "identity", "User-Agent": "nodecache"}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        if etag:
            headers["If-Match"] = f'"{etag}"'
        origin = endpoint(url)[:3]
        trusted = sign is not None
        for _ in range(_MAX_REDIRECTS + 1):
            scheme, host, port, target = endpoint(url)
            trusted = trusted and (scheme, host, port) == origin
            hop = {**headers, **sign("GET", url)} if trusted and sign is not None else headers
            resp = self._request(scheme, host, port, target, hop)
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                resp.read()
                if not location:
                    raise SourceHttpError(resp.status, "", "redirect without Location")
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise SourceHttpError(resp.status, "", "redirect to a non-HTTP location")
                continue
            try:
                pos, reusable = self._body(resp, start, end, sink, chunk_size, size)
            except BaseException:
                self._drop(scheme, host, port)
                raise
            if not reusable:
                self._drop(scheme, host, port)
            return pos
        raise SourceHttpError(310, "", "too many redirects")

    def call(
        self, method: str, url: str, headers: dict[str, str], *, limit: int | None = None
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        """One small request (a listing, a HEAD): status, response (for headers), body.

        With ``limit``, at most ``limit + 1`` bytes of the body are read (more than
        ``limit`` says "too large" without holding what a hostile server sends)."""
        scheme, host, port, target = endpoint(url)
        resp = self._request(scheme, host, port, target, headers, method)
        try:
            # listing pages and error bodies: small
            body = resp.read() if limit is None else resp.read(limit + 1)
        except BaseException:
            self._drop(scheme, host, port)
            raise
        if resp.will_close or not resp.isclosed():
            self._drop(scheme, host, port)
        return resp.status, resp, body

    def _request(
        self,
        scheme: str,
        host: str,
        port: int,
        target: str,
        headers: dict[str, str],
        method: str = "GET",
    ) -> http.client.HTTPResponse:
        for attempt in range(2):
            conn, reused = self._connection(scheme, host, port)
            try:
                conn.request(method, target, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop(scheme, host, port)
                if not reused or attempt:
                    raise
            except BaseException:
                self._drop(scheme, host, port)
                raise
        raise AssertionError("unreachable")

    def _body(
        self,
        resp: http.client.HTTPResponse,
        start: int,
        end: int | None,
        sink: Sink,
        chunk_size: int,
        size: int | None = None,
    ) -> tuple[int, bool]:
        if resp.status >= 400:
            body = resp.read(64 * 1024)
            raise parse_http_error(resp.status, body)
        skip = 0
        if resp.status == 206:
            first = _content_range_start(resp.getheader("Content-Range"))
            if first != start:
                raise IntegrityError(
                    f"source answered range {first} when asked for {start}; refusing"
                )
        elif resp.status == 200:
            skip = start  # the server ignored Range: read past what we already have
        else:
            raise SourceHttpError(resp.status, "", resp.reason)
        buf = thread_buffer(chunk_size)
        pos = start
        while skip:
            n = resp.readinto(buf[: min(chunk_size, skip)])
            if n == 0:
                raise http.client.IncompleteRead(b"")
            skip -= n
        while end is None or pos < end:
            want = chunk_size if end is None else min(chunk_size, end - pos)
            n = resp.readinto(buf[:want])
            if n == 0:
                break
            sink(pos, buf[:n])
            pos += n
        if end is not None and pos < end:
            if resp.length == 0:  # a complete answer, just shorter than the size announced
                raise IntegrityError(
                    f"source served {pos - start} bytes where {end - start} were announced"
                )
            raise http.client.IncompleteRead(b"", end - pos)
        if end is not None:
            # Never read an unknown rest to the end (it may not have one): one byte says
            # whether there is more.
            more = resp.length if resp.length is not None else len(resp.read(1))
            if more:
                if size is not None and end >= size:
                    raise IntegrityError(f"source sent more than the {size} bytes it announced")
                return pos, False  # unread rest of a full-body answer: do not reuse
        resp.read()  # nothing left: lets the connection be reused
        return pos, True


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def endpoint(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an absolute URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return parts.scheme, parts.hostname or "", port, target
