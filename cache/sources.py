"""Sources: what a source URI lists, and reading byte ranges of its objects.

Listing and metadata go through fsspec (s3fs, gcsfs, its HTTP filesystem). The byte path
avoids fsspec's single event-loop thread where it can: ``http(s)`` objects and ``s3`` objects
(through presigned URLs) are read with blocking ranged GETs, one keep-alive connection per
worker thread, straight into a reused buffer. Everything here is blocking and runs in worker
threads. Library errors are translated into :mod:`nodecache.cache.errors` at this boundary, with
credentials masked.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import logging
import os
import posixpath
import re
import ssl
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urljoin, urlsplit

from nodecache.cache.errors import CacheError, FetchError, InsufficientSpaceError, IntegrityError
from nodecache.cache.uri import redact_uri, validate_source_uri

__all__ = [
    "DERIVED_DIR",
    "MANIFEST_NAME",
    "RESERVED_PREFIX",
    "RemoteFile",
    "Sink",
    "Source",
    "SourceHttpError",
    "check_relative_path",
    "is_transient",
    "open_source",
    "scrub",
    "translate_error",
]

RESERVED_PREFIX = ".nodecache-"
"""Names starting with this at the top of a model folder belong to nodecache."""
MANIFEST_NAME = RESERVED_PREFIX + "manifest.json"
"""Name of the manifest inside a model folder; never one of the model's files."""
DERIVED_DIR = RESERVED_PREFIX + "derived"
"""Folder inside a model folder for files built from the model's own (a runtime's
faster-loading copy): removed with the model and counted against the store's limit."""

log = logging.getLogger(__name__)

Sink = Callable[[int, memoryview], None]
"""``sink(offset, data)``: write ``data`` at ``offset`` of the destination file."""

_MAX_HTTP_ENTRIES = 100_000
_S3_PAGE = 1000
"""Keys per ``ListObjectsV2`` page (S3's maximum)."""
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class RemoteFile:
    """One object of a source, as listed."""

    path: str
    """Relative posix path inside the model folder."""
    url: str
    """What the source reads (a local path, a URL, ``bucket/key``)."""
    size: int | None
    """Size the source publishes; None when it publishes none (HTTP without a length)."""
    etag: str | None = None
    """Entity tag, quotes stripped; ranged reads are pinned to it where the source allows."""
    md5: str | None = None
    """Hex MD5 of the content as the source publishes it (S3 single-part ETag, GCS md5Hash)."""
    ranges: bool = True
    """False when the source cannot serve byte ranges (then: one stream, no resume)."""


class SourceHttpError(Exception):
    """An HTTP error status from a source, with the source's own code and message."""

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"HTTP {status} {code} {message}".strip())


def check_relative_path(path: str, source: str) -> str:
    """Return ``path`` if it is a safe relative path inside a model folder, else raise.

    Refuses absolute paths, empty, ``.`` and ``..`` segments, NUL bytes and backslashes, and
    top-level names reserved for nodecache.
    """
    segments = path.split("/")
    bad = (
        not path
        or path.startswith("/")
        or "\x00" in path
        or "\\" in path
        or any(s in ("", ".", "..") for s in segments)
        or segments[0].startswith(RESERVED_PREFIX)
    )
    if bad:
        raise FetchError(
            f"refusing object {path!r} of {redact_uri(source)}: "
            "its path would escape the model folder or clash with nodecache's own files",
            permanent=True,
        )
    return path


class Source:
    """One source URI: what it lists and how to read a byte range of one object."""

    def __init__(
        self,
        uri: str,
        *,
        chunk_size: int,
        timeout: float,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.credentials: Mapping[str, str] = credentials or {}

    def setting(self, *names: str) -> str | None:
        """The first of ``names`` set in the credentials given, else in the environment."""
        for name in names:
            if self.credentials.get(name):
                return self.credentials[name]
        for name in names:
            if os.environ.get(name):
                return os.environ[name]
        return None

    def list_files(self) -> list[RemoteFile]:
        raise NotImplementedError

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        """Deliver bytes ``[start, end)`` (to the end when ``end`` is None) to ``sink``.

        Returns the offset reached. Raises on error; bytes already delivered stay delivered,
        so a retry continues from the offset the sink has seen.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release connections. Safe to call more than once."""

    def _finish_listing(self, files: list[RemoteFile]) -> list[RemoteFile]:
        if not files:
            raise FetchError(f"no files found under {redact_uri(self.uri)}", permanent=True)
        files.sort(key=lambda f: f.path)
        seen: set[str] = set()
        for f in files:
            check_relative_path(f.path, self.uri)
            if f.path in seen:
                raise FetchError(f"{redact_uri(self.uri)} lists {f.path!r} twice", permanent=True)
            seen.add(f.path)
        for f in files:  # "a" as a file and "a/b" as a file cannot both exist on disk
            parent = posixpath.dirname(f.path)
            while parent:
                if parent in seen:
                    raise FetchError(
                        f"{redact_uri(self.uri)} has both a file and a folder named {parent!r}",
                        permanent=True,
                    )
                parent = posixpath.dirname(parent)
        return files


# ---- file:// ---------------------------------------------------------------------------------


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
            return self._finish_listing([RemoteFile(posixpath.basename(root), root, st.st_size)])
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
        return self._finish_listing(files)

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        buf = _buffer(self.chunk_size)
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


# ---- blocking HTTP ranged reads -------------------------------------------------------------


class _Connections(threading.local):
    def __init__(self) -> None:
        self.pool: dict[tuple[str, str, int], http.client.HTTPConnection] = {}


_BUFFERS = threading.local()


def _buffer(size: int) -> memoryview:
    """A per-thread reusable buffer of at least ``size`` bytes."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) < size:
        buf = memoryview(bytearray(size))
        _BUFFERS.buf = buf
    return buf[:size]


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
        origin = _endpoint(url)[:3]
        trusted = sign is not None
        for _ in range(_MAX_REDIRECTS + 1):
            scheme, host, port, target = _endpoint(url)
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
        self, method: str, url: str, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        """One small request (a listing, a HEAD): status, response (for headers), body."""
        scheme, host, port, target = _endpoint(url)
        resp = self._request(scheme, host, port, target, headers, method)
        try:
            body = resp.read()  # listing pages and error bodies: small
        except BaseException:
            self._drop(scheme, host, port)
            raise
        if resp.will_close:
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
            raise _http_error(resp.status, body)
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
        buf = _buffer(chunk_size)
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


def _http_error(status: int, body: bytes) -> SourceHttpError:
    text = body.decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]{1,100})</Code>", text)
    message = re.search(r"<Message>([^<]{1,300})</Message>", text)
    return SourceHttpError(
        status,
        code.group(1) if code else "",
        scrub(message.group(1)) if message else "",
    )


# ---- http(s):// ----------------------------------------------------------------------------


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
            return self._finish_listing([self._remote(name, self.uri, self._info(self.uri))])
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
            infos = _map_threads(self._info, candidates)
            for url, info in zip(candidates, infos, strict=True):
                if info.get("mimetype") == "text/html" and self.fs.ls(url, detail=False):
                    folders.append(url)
                else:
                    files.append(self._remote(unquote(url[len(base) :]), url, info))
        return self._finish_listing(files)

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


# ---- s3:// ---------------------------------------------------------------------------------


class _FsspecBucketSource(Source):
    """An object store listed through fsspec (``self.fs``, ``self.root`` = bucket/key):
    a key that is a prefix is a folder, anything else one object."""

    fs: Any
    root: str

    @staticmethod
    def _remote(path: str, info: dict[str, Any]) -> RemoteFile:
        raise NotImplementedError

    def list_files(self) -> list[RemoteFile]:
        info = self.fs.info(self.root)
        if info.get("type") != "directory":
            return self._finish_listing([self._remote(posixpath.basename(self.root), info)])
        prefix = self.root.rstrip("/") + "/"
        found = self.fs.find(self.root, detail=True)
        files = [
            self._remote(name[len(prefix) :], meta)
            for name, meta in found.items()
            if name.startswith(prefix)
            and not name.endswith("/")
            and meta.get("type", "file") == "file"
        ]
        return self._finish_listing(files)


class S3fsSource(_FsspecBucketSource):
    """``s3://`` through s3fs: listing through s3fs, bytes through presigned ranged GETs.

    Used only where :class:`S3Source` cannot go: a bucket name that cannot be
    virtual-hosted on AWS, anonymous access with no region to sign for, or no credentials
    found by botocore's chain (s3fs then reports what it finds).
    """

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        import s3fs

        options: dict[str, Any] = {}
        key = self.setting("AWS_ACCESS_KEY_ID")
        secret = self.setting("AWS_SECRET_ACCESS_KEY")
        token = self.setting("AWS_SESSION_TOKEN")
        shared = self.credentials.get("AWS_SHARED_CREDENTIALS_FILE")
        if shared and not (self.credentials.get("AWS_ACCESS_KEY_ID")):
            key, secret, token = _read_credentials_file(
                shared, self.credentials.get("AWS_PROFILE") or "default"
            )
        if key and secret:
            options.update(key=key, secret=secret, token=token)
        endpoint = self.setting("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT")
        if endpoint:
            if "://" not in endpoint:
                endpoint = "https://" + endpoint
            options["endpoint_url"] = endpoint
        region = self.setting("AWS_REGION", "AWS_DEFAULT_REGION")
        if region:
            options["client_kwargs"] = {"region_name": region}
        if self.setting("AWS_NO_SIGN_REQUEST") in ("1", "true", "yes"):
            options = {"anon": True, **{k: v for k, v in options.items() if k == "endpoint_url"}}
        self.fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            config_kwargs={
                "connect_timeout": self.timeout,
                "read_timeout": self.timeout,
                "signature_version": "s3v4",
                "http_session_cls": _unredirected_session_class(),
            },
            **options,
        )
        self.anon = bool(options.get("anon"))
        self.endpoint = endpoint or "https://s3.amazonaws.com"
        self.root = uri[len("s3://") :]
        self.http = HttpRanges(self.timeout)

    def close(self) -> None:
        self.http.close()

    @staticmethod
    def _remote(path: str, info: dict[str, Any]) -> RemoteFile:
        etag = str(info.get("ETag") or "").strip('"') or None
        md5 = etag if etag and re.fullmatch(r"[0-9a-f]{32}", etag) else None
        return RemoteFile(path, info["name"], int(info["size"]), etag=etag, md5=md5)

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        if self.anon:
            url = f"{self.endpoint.rstrip('/')}/{quote(remote.url, safe='/~')}"
        else:
            url = self.fs.url(remote.url, expires=3600)
        return self.http.get(
            url, start, end, sink, chunk_size=self.chunk_size, etag=remote.etag, size=remote.size
        )


def _unredirected_session_class() -> type:
    """aiobotocore's HTTP session, except that it never follows a redirect.

    aiobotocore lets aiohttp follow 301/302/307 answers, and aiohttp drops only the
    ``Authorization`` header when the redirect leaves the host: the session token and the
    other signing headers went on to whatever host the endpoint named (checked against a
    real redirecting server, aiobotocore 3.10). An S3 endpoint has no business redirecting a
    signed request elsewhere, so the answer goes back to botocore as it is (an error; an S3
    region redirect is still handled by botocore, which signs for the right region itself).
    """
    from aiobotocore.httpsession import AIOHTTPSession

    class UnredirectedSession(AIOHTTPSession):  # type: ignore[misc]
        async def _get_session(self, proxy_url: Any) -> Any:
            return _NoRedirects(await super()._get_session(proxy_url))

    return UnredirectedSession


class _NoRedirects:
    """An aiohttp session whose requests never follow redirects."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.request(*args, **{**kwargs, "allow_redirects": False})


class S3Source(Source):
    """``s3://`` signed by us: ``HEAD``, ``ListObjectsV2`` and ranged ``GET`` requests over
    the same per-thread keep-alive connections.

    No event-loop thread (and no botocore import when credentials are given as values):
    the first byte comes ~1 s sooner than through s3fs, and each file costs one signature
    (a few HMACs) instead of a presign hop.
    """

    def __init__(self, uri: str, *, config: _S3Config, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        from nodecache.cache.sigv4 import SigV4

        self.config = config
        self.signer = (
            None
            if config.anon
            else SigV4(
                config.key or "",
                config.secret or "",
                config.token,
                config.region,
                refresh=config.refresh,
            )
        )
        self.http = HttpRanges(self.timeout, cafile=self.setting("AWS_CA_BUNDLE"))
        self.root = uri[len("s3://") :]
        self.bucket, _, self.key = self.root.partition("/")

    def close(self) -> None:
        self.http.close()

    def _url(self, key: str, query: str = "") -> str:
        from nodecache.cache.sigv4 import uri_encode

        config = self.config
        path = uri_encode(key)
        if config.virtual_host:
            region = self.signer.region if self.signer else config.region
            base = f"https://{self.bucket}.s3.{region}.amazonaws.com/{path}"
        else:
            base = f"{config.endpoint.rstrip('/')}/{uri_encode(self.bucket)}/{path}"
        return base + ("?" + query if query else "")

    def _sign(self, method: str, url: str) -> dict[str, str]:
        return {} if self.signer is None else self.signer.headers(method, url)

    def _call(self, method: str, key: str, query: str = "") -> tuple[int, Any, bytes]:
        """A signed request; follows a bucket's region once (no region was configured)."""
        for _ in range(2):
            url = self._url(key, query)
            headers = {"User-Agent": "nodecache", **self._sign(method, url)}
            status, resp, body = self.http.call(method, url, headers)
            region = resp.getheader("x-amz-bucket-region")
            if (
                status in (301, 307, 400)
                and region
                and self.signer is not None
                and region != self.signer.region
                and not self.config.region_given
            ):
                self.signer.region = region
                continue
            return status, resp, body
        return status, resp, body

    def list_files(self) -> list[RemoteFile]:
        key = self.key.rstrip("/")
        if key and not self.key.endswith("/"):
            status, resp, body = self._call("HEAD", key)
            if status == 200:
                length = resp.getheader("Content-Length")
                if length is None:
                    raise SourceHttpError(status, "", "HEAD answered without a Content-Length")
                info = {"name": f"{self.bucket}/{key}", "size": int(length)}
                info["ETag"] = resp.getheader("ETag")
                return self._finish_listing([S3fsSource._remote(posixpath.basename(key), info)])
            if status != 404:
                raise _http_error(status, body) if body else _head_error(status, resp)
        prefix = key + "/" if key else ""
        files = [
            S3fsSource._remote(name[len(prefix) :], {"name": f"{self.bucket}/{name}", **meta})
            for name, meta in self._list(prefix)
            if not name.endswith("/")
        ]
        if not files:
            raise SourceHttpError(404, "NoSuchKey", f"nothing at {redact_uri(self.uri)}")
        return self._finish_listing(files)

    def _list(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        import xml.etree.ElementTree as ET

        from nodecache.cache.sigv4 import canonical_query

        out: list[tuple[str, dict[str, Any]]] = []
        token = None
        while True:
            params = {
                "list-type": "2",
                "encoding-type": "url",
                "prefix": prefix,
                "max-keys": str(_S3_PAGE),
            }
            if token:
                params["continuation-token"] = token
            status, _resp, body = self._call("GET", "", canonical_query(params))
            if status != 200:
                raise _http_error(status, body)
            root = ET.fromstring(body)
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
            for item in root.iter(f"{ns}Contents"):
                name = item.findtext(f"{ns}Key") or ""
                if encoded:
                    name = unquote_plus(name)
                out.append(
                    (
                        name,
                        {
                            "size": int(item.findtext(f"{ns}Size") or 0),
                            "ETag": item.findtext(f"{ns}ETag"),
                        },
                    )
                )
                if len(out) > _MAX_HTTP_ENTRIES * 10:
                    raise FetchError(f"{redact_uri(self.uri)} lists too many objects")
            truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
            token = root.findtext(f"{ns}NextContinuationToken")
            if not truncated or not token:
                return out

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        url = self._url(remote.url.partition("/")[2])
        return self.http.get(
            url,
            start,
            end,
            sink,
            chunk_size=self.chunk_size,
            etag=remote.etag,
            sign=None if self.signer is None else self.signer.headers,
            size=remote.size,
        )


@dataclass(frozen=True)
class _S3Config:
    """Where and as whom an S3 source is read, resolved from credentials and environment."""

    endpoint: str
    region: str
    region_given: bool
    key: str | None
    secret: str | None
    token: str | None
    anon: bool
    refresh: Callable[[], tuple[str, str, str | None]] | None = None
    """Current credentials from botocore's chain, when none were given as values."""

    @property
    def virtual_host(self) -> bool:
        return self.endpoint == ""


def _s3_config(source: Source) -> _S3Config | None:
    """The settings :class:`S3Source` can work with, or None where s3fs must resolve them."""
    key = source.setting("AWS_ACCESS_KEY_ID")
    secret = source.setting("AWS_SECRET_ACCESS_KEY")
    token = source.setting("AWS_SESSION_TOKEN")
    shared = source.credentials.get("AWS_SHARED_CREDENTIALS_FILE")
    if shared and not source.credentials.get("AWS_ACCESS_KEY_ID"):
        key, secret, token = _read_credentials_file(
            shared, source.credentials.get("AWS_PROFILE") or "default"
        )
    anon = source.setting("AWS_NO_SIGN_REQUEST") in ("1", "true", "yes")
    endpoint = source.setting("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT") or ""
    if endpoint and "://" not in endpoint:
        endpoint = "https://" + endpoint
    region = source.setting("AWS_REGION", "AWS_DEFAULT_REGION")
    refresh = None
    if not anon and not (key and secret):
        chain = _credential_chain(source.setting("AWS_PROFILE"))
        if chain is None:
            return None  # let s3fs try, and report what it finds
        refresh, chain_region = chain
        region = region or chain_region
    bucket = source.uri[len("s3://") :].partition("/")[0]
    if not endpoint and not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket):
        return None  # not addressable as <bucket>.s3.<region>.amazonaws.com
    if anon and not endpoint and not region:
        return None  # no signature to learn the bucket's region from
    return _S3Config(
        endpoint=endpoint,
        region=region or "us-east-1",
        region_given=bool(region),
        key=None if anon else key,
        secret=None if anon else secret,
        token=None if anon else token,
        anon=anon,
        refresh=refresh,
    )


def _credential_chain(
    profile: str | None,
) -> tuple[Callable[[], tuple[str, str, str | None]], str | None] | None:
    """Credentials from botocore's chain (web identity as on EKS with IRSA, EKS Pod Identity
    and ECS container credentials, instance roles, SSO, ``credential_process``, profiles),
    as a callable that returns the current ones (renewed by botocore before they expire),
    and the profile's region. None when the chain finds nothing or fails."""
    try:
        import botocore.session

        session = botocore.session.Session(profile=profile or None)
        credentials = session.get_credentials()
        region = session.get_config_variable("region")
    except Exception as exc:  # botocore's errors, a profile that is not there, ...
        log.debug("botocore's credential chain failed: %s", exc)
        return None
    if credentials is None:
        return None

    def current() -> tuple[str, str, str | None]:
        frozen = credentials.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    return current, region


def _head_error(status: int, resp: Any) -> SourceHttpError:
    """A HEAD answer has no body: the error code from the status (and S3's headers)."""
    codes = {301: "PermanentRedirect", 403: "AccessDenied", 404: "NoSuchKey"}
    code = resp.getheader("x-amz-error-code") or codes.get(status, "")
    message = resp.getheader("x-amz-error-message") or ""
    if status == 301 and resp.getheader("x-amz-bucket-region"):
        message = f"the bucket is in region {resp.getheader('x-amz-bucket-region')}"
    return SourceHttpError(status, code, message)


def _open_s3(uri: str, **kwargs: Any) -> Source:
    probe = Source(uri, **kwargs)
    config = _s3_config(probe)
    if config is None:
        return S3fsSource(uri, **kwargs)
    return S3Source(uri, config=config, **kwargs)


# ---- gs:// ---------------------------------------------------------------------------------


class GcsSource(_FsspecBucketSource):
    """``gs://``: listing through gcsfs; bytes by ranged ``GET``s of the JSON API's media
    download (``alt=media``, pinned to the listed generation) over our own keep-alive
    connections, with gcsfs's credentials (refreshed by it) in each request's headers.

    Through gcsfs each 4 MiB is a request of its own, hopping to fsspec's event-loop
    thread and back; here a part is one request streamed into the file like S3's.
    """

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs

        options: dict[str, Any] = {"skip_instance_cache": True}
        emulator = self.setting("STORAGE_EMULATOR_HOST")
        if emulator:
            options.update(
                endpoint_url=emulator,
                token="anon",
                project=self.setting("GCSFS_PROJECT", "GOOGLE_CLOUD_PROJECT") or "test",
            )
        elif self.credentials.get("GOOGLE_SERVICE_ACCOUNT_JSON"):
            import json

            options["token"] = json.loads(self.credentials["GOOGLE_SERVICE_ACCOUNT_JSON"])
        elif self.credentials.get("GOOGLE_APPLICATION_CREDENTIALS"):
            options["token"] = self.credentials["GOOGLE_APPLICATION_CREDENTIALS"]
        self.fs = gcsfs.GCSFileSystem(**options)
        self.root = uri[len("gs://") :]
        base = emulator or "https://storage.googleapis.com"
        self.base = (base if "://" in base else "http://" + base).rstrip("/")
        self.http = HttpRanges(self.timeout)

    def close(self) -> None:
        self.http.close()

    def _auth(self, method: str, url: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        self.fs.credentials.apply(headers)  # refreshes an expiring token first
        return headers

    @staticmethod
    def _remote(path: str, info: dict[str, Any]) -> RemoteFile:
        md5 = None
        if info.get("md5Hash"):
            try:
                md5 = base64.b64decode(info["md5Hash"]).hex()
            except ValueError:
                md5 = None
        return RemoteFile(
            path,
            info["name"],
            int(info["size"]),
            etag=str(info.get("generation") or "") or None,
            md5=md5,
        )

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        bucket, _, name = remote.url.partition("/")
        url = (
            f"{self.base}/download/storage/v1/b/{quote(bucket, safe='')}/o/"
            f"{quote(name, safe='')}?alt=media"
        )
        if remote.etag:  # the generation listed: a newer upload mid-download is an error
            url += f"&generation={remote.etag}"
        return self.http.get(
            url, start, end, sink, chunk_size=self.chunk_size, sign=self._auth, size=remote.size
        )


def open_source(
    uri: str,
    *,
    chunk_size: int,
    timeout: float,
    credentials: Mapping[str, str] | None = None,
) -> Source:
    """Return the :class:`Source` for ``uri``. Blocking (imports, clients).

    ``credentials`` (from a Kubernetes Secret or a credentials file, resolved by the caller)
    take precedence over the environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
    ``AWS_SHARED_CREDENTIALS_FILE`` + ``AWS_PROFILE``, ``AWS_NO_SIGN_REQUEST``;
    ``GOOGLE_APPLICATION_CREDENTIALS`` (a path), ``GOOGLE_SERVICE_ACCOUNT_JSON``,
    ``STORAGE_EMULATOR_HOST``.
    """
    uri = validate_source_uri(uri)
    scheme = uri.split("://", 1)[0]
    kinds: dict[str, Callable[..., Source]] = {
        "file": LocalSource,
        "http": HttpSource,
        "https": HttpSource,
        "s3": _open_s3,  # type: ignore[dict-item]
        "gs": GcsSource,
    }
    try:
        return kinds[scheme](uri, chunk_size=chunk_size, timeout=timeout, credentials=credentials)
    except CacheError:
        raise
    except Exception as exc:
        raise translate_error(exc, uri) from None


def _endpoint(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an absolute URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return parts.scheme, parts.hostname or "", port, target


def _read_credentials_file(path: str, profile: str) -> tuple[str, str, str | None]:
    """``aws_access_key_id`` etc. of ``profile`` in an AWS shared credentials file."""
    import configparser

    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
        section = parser[profile]
        return (
            section["aws_access_key_id"],
            section["aws_secret_access_key"],
            section.get("aws_session_token"),
        )
    except (OSError, KeyError, configparser.Error) as exc:
        raise FetchError(
            f"cannot read profile {profile!r} from the credentials file {path}: "
            f"{type(exc).__name__}",
            permanent=True,
        ) from None


def mask_secrets(error: CacheError, credentials: Mapping[str, str] | None) -> CacheError:
    """Replace any credential value that slipped into ``error``'s message with ``***``."""
    if not credentials or not error.args:
        return error
    message = str(error.args[0])
    for name, value in credentials.items():
        if value and len(value) >= 4 and "FILE" not in name and "ENDPOINT" not in name:
            message = message.replace(value, "***")
    error.args = (message, *error.args[1:])
    return error


def _map_threads(fn: Callable[[str], Any], items: list[str], workers: int = 8) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


# ---- error translation -----------------------------------------------------------------------

_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 411, 416}
_PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "NoSuchKey",
    "InvalidBucketName",
    "AccountProblem",
    "ExpiredToken",
    "InvalidToken",
    "InvalidObjectState",
    "PermanentRedirect",  # the bucket is in another region than the one configured
    "AuthorizationHeaderMalformed",
}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
_URL_SECRETS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]*@|\?[^\s'\"]*")


def scrub(text: str) -> str:
    """Mask anything URL-shaped in ``text`` that could carry a secret (user info, query)."""
    return _URL_SECRETS.sub(
        lambda m: (m.group("scheme") + "***@") if m.group("scheme") else "?***", text
    )


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request later may succeed."""
    if isinstance(exc, FetchError):
        return not exc.permanent
    if isinstance(exc, CacheError):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return False
    known = (
        isinstance(exc, OSError | SourceHttpError | http.client.HTTPException)
        or _is_transport_error(exc)
        or _status_of(exc) is not None
        or _code_of(exc) is not None
    )
    # Anything else is a bug or a surprise: fail now rather than retry it.
    return known and not _classify(exc)[0]


def translate_error(exc: BaseException, uri: str, path: str | None = None) -> CacheError:
    """Turn a library error into a :class:`CacheError` with a message a person can act on."""
    if isinstance(exc, CacheError):
        return exc
    where = redact_uri(uri) if path is None else f"{path!r} of {redact_uri(uri)}"
    permanent, detail = _classify(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(f"disk full while fetching {where}: {detail}")
    if isinstance(exc, SourceHttpError) and exc.code == "PreconditionFailed":
        return IntegrityError(f"{where} changed on the source during the download")
    kind = "permanent" if permanent else "transient"
    return FetchError(f"fetching {where} failed ({kind}): {detail}", permanent=permanent)


def _classify(exc: BaseException) -> tuple[bool, str]:
    """Return (permanent, short description) for a library error."""
    name = type(exc).__name__
    text = scrub(str(exc)) or name
    if isinstance(exc, SourceHttpError):
        permanent = exc.status in _PERMANENT_HTTP or exc.code in _PERMANENT_CODES
        if exc.code in _TRANSIENT_CODES:
            permanent = False
        return permanent, _http_detail(exc.status, exc)
    if _is_transport_error(exc):
        return False, f"{name}: {text}"
    status = _status_of(exc)
    code = _code_of(exc)
    if code in _PERMANENT_CODES:
        return True, f"{code}: {text}"
    if code in _TRANSIENT_CODES:
        return False, f"{code}: {text}"
    if status is not None:
        return status in _PERMANENT_HTTP, _http_detail(status, exc)
    if isinstance(exc, FileNotFoundError):
        return True, "not found"
    if isinstance(exc, PermissionError):
        return True, f"access denied: {text}"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return True, f"{name}: {text}"
    if isinstance(exc, TimeoutError):
        return False, f"timed out: {text}"
    return False, f"{name}: {text}"


def _is_transport_error(exc: BaseException) -> bool:
    """A connection-level failure (reset, truncated body, timeout): always worth a retry."""
    import aiohttp

    transport = (
        aiohttp.ClientPayloadError,
        aiohttp.ClientConnectionError,
        aiohttp.ServerTimeoutError,
        http.client.HTTPException,
        ConnectionError,
        TimeoutError,
    )
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            break
        if isinstance(current, transport) and not isinstance(current, FileNotFoundError):
            return True
        current = current.__cause__ or current.__context__
    return False


def _http_detail(status: int, exc: BaseException) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    detail = f"HTTP {status} {phrase}".rstrip()
    if status == 404:
        detail += " (not found)"
    code = getattr(exc, "code", "")
    if isinstance(code, str) and code:
        detail += f" {code}"
    message = scrub(str(getattr(exc, "message", "") or "")).strip()
    if message and message.lower() != phrase.lower() and "://" not in message:
        detail += f": {message}"
    return detail


def _status_of(exc: BaseException, depth: int = 0) -> int | None:
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and depth < 5:
        return _status_of(cause, depth + 1)
    return None


def _code_of(exc: BaseException, depth: int = 0) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and depth < 5:
        return _code_of(cause, depth + 1)
    return None
