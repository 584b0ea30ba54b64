"""Reading sources: listing what a source URI names, and streaming its bytes to disk.

Everything here is blocking and runs in worker threads (the store calls it through an
executor), never on the event loop. Library errors (fsspec, aiohttp, botocore, gcsfs) are
translated into :mod:`cache.errors` at this boundary, with credentials masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import posixpath
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cache.errors import CacheError, FetchError, InsufficientSpaceError, IntegrityError
from cache.uri import redact_uri, validate_source_uri

__all__ = [
    "MANIFEST_NAME",
    "FetchOptions",
    "FetchedFile",
    "RemoteFile",
    "Source",
    "check_relative_path",
    "download_file",
    "open_source",
    "translate_error",
]

MANIFEST_NAME = ".nodecache-manifest.json"
"""Name of the manifest inside a model folder; never one of the model's files."""

MiB = 1 << 20


@dataclass(frozen=True)
class FetchOptions:
    """How the store reads from sources. Defaults suit NVMe and a fast object store."""

    concurrency: int = 8
    """Files (later: ranged parts) read at the same time."""
    chunk_size: int = 8 * MiB
    """Bytes per read request and per write; bounds memory to about concurrency x chunk_size."""
    connect_timeout: float = 30.0
    """Seconds to wait for a connection to the source."""
    read_timeout: float = 60.0
    """Seconds without a byte from the source before the read counts as stalled."""
    fsync: bool = True
    """Flush every file to stable storage before publishing, so a power loss never leaves a
    published model with missing bytes."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.chunk_size < 64 * 1024:
            raise ValueError("chunk_size must be at least 64 KiB")


@dataclass(frozen=True)
class RemoteFile:
    """One object of a source, as listed."""

    path: str
    """Relative posix path inside the model folder."""
    url: str
    """What the source's filesystem opens (a local path, a URL, ``bucket/key``)."""
    size: int | None
    """Size the source publishes, or None when it publishes none (HTTP without a length)."""


@dataclass(frozen=True)
class FetchedFile:
    """One file written and verified on disk."""

    path: str
    size: int
    sha256: str


def check_relative_path(path: str, source: str) -> str:
    """Return ``path`` if it is a safe relative path inside a model folder, else raise.

    Refuses absolute paths, empty, ``.`` and ``..`` segments, NUL bytes, and the manifest name.
    """
    segments = path.split("/")
    bad = (
        not path
        or path.startswith("/")
        or "\x00" in path
        or any(s in ("", ".", "..") for s in segments)
        or path == MANIFEST_NAME
    )
    if bad:
        raise FetchError(
            f"refusing object {path!r} of {redact_uri(source)}: "
            "its path would escape the model folder or clash with the manifest",
            permanent=True,
        )
    return path


class Source:
    """One source URI: its filesystem, what it lists, and how to read one object.

    Subclasses per scheme override :meth:`list_files` and :meth:`iter_bytes`.
    """

    def __init__(self, uri: str, options: FetchOptions) -> None:
        self.uri = uri
        self.options = options

    def list_files(self) -> list[RemoteFile]:
        raise NotImplementedError

    def iter_bytes(self, remote: RemoteFile) -> Iterator[bytes]:
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
        # "a" as a file and "a/b" as a file cannot both exist on disk.
        for f in files:
            parent = posixpath.dirname(f.path)
            while parent:
                if parent in seen:
                    raise FetchError(
                        f"{redact_uri(self.uri)} has both a file and a folder named {parent!r}",
                        permanent=True,
                    )
                parent = posixpath.dirname(parent)
        return files


class LocalSource(Source):
    """``file://``: a folder (walked, symlinks may not leave it) or a single file."""

    def __init__(self, uri: str, options: FetchOptions) -> None:
        super().__init__(uri, options)
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
            name = posixpath.basename(root)
            return self._finish_listing([RemoteFile(name, root, st.st_size)])
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

    def iter_bytes(self, remote: RemoteFile) -> Iterator[bytes]:
        size = self.options.chunk_size
        with open(remote.url, "rb", buffering=0) as f:
            while chunk := f.read(size):
                yield chunk


class FsspecSource(Source):
    """Sources read through an fsspec filesystem (``http(s)``, ``s3``, ``gs``)."""

    def __init__(self, uri: str, options: FetchOptions, fs: Any, root: str) -> None:
        super().__init__(uri, options)
        self.fs = fs
        self.root = root

    def close(self) -> None:
        session = getattr(self.fs, "_session", None)
        closer = getattr(self.fs, "close_session", None)
        if session is not None and closer is not None:
            with contextlib.suppress(Exception):
                closer(self.fs.loop, session)


class HttpSource(FsspecSource):
    """``http(s)://``: a URL ending in ``/`` is a folder listed through its index page."""

    def __init__(self, uri: str, options: FetchOptions) -> None:
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=options.connect_timeout,
            sock_read=options.read_timeout,
        )
        fs = HTTPFileSystem(
            skip_instance_cache=True,
            client_kwargs={"timeout": timeout, "auto_decompress": False},
            headers={"Accept-Encoding": "identity"},
        )
        super().__init__(uri, options, fs, uri)

    def list_files(self) -> list[RemoteFile]:
        if not self.uri.endswith("/"):
            name = unquote(posixpath.basename(urlsplit(self.uri).path))
            size = self._info(self.uri).get("size")
            return self._finish_listing([RemoteFile(name, self.uri, _int_or_none(size))])
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
                raise FetchError(f"{self.uri} lists too many entries", permanent=True)
            folders = [u for u in links if u.endswith("/")]
            candidates = [u for u in links if not u.endswith("/")]
            infos = _map_threads(self._info, candidates, self.options.concurrency)
            for url, info in zip(candidates, infos, strict=True):
                if info.get("mimetype") == "text/html" and self.fs.ls(url, detail=False):
                    folders.append(url)
                else:
                    rel = unquote(url[len(base) :])
                    files.append(RemoteFile(rel, url, _int_or_none(info.get("size"))))
        return self._finish_listing(files)

    def _info(self, url: str) -> dict[str, Any]:
        return self.fs.info(url)

    def iter_bytes(self, remote: RemoteFile) -> Iterator[bytes]:
        chunk = self.options.chunk_size
        f = self.fs.open(remote.url, "rb", block_size=0, size=remote.size)
        try:
            while data := f.read(chunk):
                yield data
        finally:
            f.close()


class ObjectStoreSource(FsspecSource):
    """``s3://`` and ``gs://``: a key that is a prefix is a folder; otherwise one object."""

    def list_files(self) -> list[RemoteFile]:
        info = self.fs.info(self.root)
        if info.get("type") != "directory":
            name = posixpath.basename(self.root)
            return self._finish_listing([RemoteFile(name, self.root, int(info["size"]))])
        prefix = self.root.rstrip("/") + "/"
        found = self.fs.find(self.root, detail=True)
        files = [
            RemoteFile(name[len(prefix) :], name, int(meta["size"]))
            for name, meta in found.items()
            if name.startswith(prefix)
            and not name.endswith("/")
            and meta.get("type", "file") == "file"
        ]
        return self._finish_listing(files)

    def iter_bytes(self, remote: RemoteFile) -> Iterator[bytes]:
        chunk = self.options.chunk_size
        with self.fs.open(remote.url, "rb", block_size=chunk, cache_type="none") as f:
            while data := f.read(chunk):
                yield data


def _s3_source(uri: str, options: FetchOptions) -> Source:
    import s3fs

    fs = s3fs.S3FileSystem(
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": options.connect_timeout,
            "read_timeout": options.read_timeout,
        },
    )
    return ObjectStoreSource(uri, options, fs, uri[len("s3://") :])


def _gs_source(uri: str, options: FetchOptions) -> Source:
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs

    kwargs: dict[str, Any] = {"skip_instance_cache": True}
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        kwargs.update(token="anon", project=os.environ.get("GCSFS_PROJECT", "test"))
    fs = gcsfs.GCSFileSystem(**kwargs)
    return ObjectStoreSource(uri, options, fs, uri[len("gs://") :])


def open_source(uri: str, options: FetchOptions) -> Source:
    """Return the :class:`Source` for a validated ``uri``. Blocking (imports, clients)."""
    uri = validate_source_uri(uri)
    scheme = uri.split("://", 1)[0]
    try:
        if scheme == "file":
            return LocalSource(uri, options)
        if scheme in ("http", "https"):
            return HttpSource(uri, options)
        if scheme == "s3":
            return _s3_source(uri, options)
        return _gs_source(uri, options)
    except CacheError:
        raise
    except Exception as exc:
        raise translate_error(exc, uri) from None


_MAX_HTTP_ENTRIES = 100_000


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _map_threads(fn: Callable[[str], Any], items: list[str], workers: int) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


class Aborted(Exception):
    """Internal: another part of the same fetch failed or the fetch was cancelled."""


def download_file(
    source: Source,
    remote: RemoteFile,
    dest_root: Path,
    *,
    on_bytes: Callable[[int], None],
    abort: threading.Event,
) -> FetchedFile:
    """Stream ``remote`` into ``dest_root/remote.path``, hashing while writing. Blocking.

    Raises :class:`IntegrityError` when the byte count differs from the published size, or
    another :class:`CacheError` (translated) when reading or writing fails.
    """
    dest = dest_root / remote.path
    hasher = hashlib.sha256()
    written = 0
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb", buffering=0) as out:
            for data in source.iter_bytes(remote):
                if abort.is_set():
                    raise Aborted
                view = memoryview(data)
                while view:
                    n = out.write(view)
                    view = view[n:]
                hasher.update(data)
                written += len(data)
                if remote.size is not None and written > remote.size:
                    break
                on_bytes(len(data))
            if source.options.fsync:
                os.fsync(out.fileno())
    except (Aborted, CacheError):
        raise
    except Exception as exc:
        raise translate_error(exc, source.uri, remote.path) from None
    if remote.size is not None and written != remote.size:
        raise IntegrityError(
            f"{remote.path!r} of {redact_uri(source.uri)}: received {written} bytes, "
            f"the source says {remote.size}"
        )
    return FetchedFile(remote.path, written, hasher.hexdigest())


_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 411, 412, 416}
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
}
_URL_SECRETS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]*@|\?[^\s'\"]*")


def scrub(text: str) -> str:
    """Mask anything URL-shaped in ``text`` that could carry a secret (user info, query)."""
    return _URL_SECRETS.sub(
        lambda m: (m.group("scheme") + "***@") if m.group("scheme") else "?***", text
    )


def translate_error(exc: BaseException, uri: str, path: str | None = None) -> CacheError:
    """Turn a library error into a :class:`CacheError` with a message a person can act on."""
    where = redact_uri(uri) if path is None else f"{path!r} of {redact_uri(uri)}"
    if isinstance(exc, CacheError):
        return exc
    permanent, detail = _classify(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(f"disk full while fetching {where}: {detail}")
    kind = "permanent" if permanent else "transient"
    return FetchError(f"fetching {where} failed ({kind}): {detail}", permanent=permanent)


def _classify(exc: BaseException) -> tuple[bool, str]:
    """Return (permanent, short description) for a library error."""
    name = type(exc).__name__
    text = scrub(str(exc)) or name
    if _is_transport_error(exc):
        return False, f"{name}: {text}"
    status = _status_of(exc)
    code = _code_of(exc)
    if code in _PERMANENT_CODES:
        return True, f"{code}: {text}"
    if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
        return False, f"{code}: {text}"
    if status is not None:
        return status in _PERMANENT_HTTP, _http_detail(status, exc)
    if isinstance(exc, FileNotFoundError):
        return True, "not found"
    if isinstance(exc, PermissionError):
        return True, f"access denied: {text}"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return True, f"{name}: {text}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return False, f"timed out: {text}"
    return False, f"{name}: {text}"


def _is_transport_error(exc: BaseException) -> bool:
    """A connection-level failure (reset, truncated body, timeout): always worth a retry."""
    import aiohttp

    transport = (
        aiohttp.ClientPayloadError,
        aiohttp.ClientConnectionError,
        aiohttp.ServerTimeoutError,
        ConnectionError,
        TimeoutError,
    )
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 6:
        if isinstance(current, transport) and not isinstance(current, FileNotFoundError):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _http_detail(status: int, exc: BaseException) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    detail = f"HTTP {status} {phrase}".rstrip()
    if status == 404:
        detail += " (not found)"
    message = scrub(str(getattr(exc, "message", "") or "")).strip()
    if message and message.lower() != phrase.lower() and "://" not in message:
        detail += f": {message}"
    return detail


def _status_of(exc: BaseException) -> int | None:
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
    if cause is not None and cause is not exc:
        return _status_of(cause)
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
