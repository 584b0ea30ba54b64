"""What every source is: a listing of :class:`RemoteFile`\\ s and ranged reads into a sink.

A source module writes :meth:`Source.list_files` and :meth:`Source.read_range` (and
:meth:`Source.close` where it holds connections); :func:`finish_listing` gives every
source the same rules for what a listing may contain. Everything here is blocking and runs
in worker threads.
"""

from __future__ import annotations

import os
import posixpath
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodecache.cache.budget import WriteBudget
from nodecache.cache.checksums import CompositeCrc
from nodecache.cache.errors import FetchError
from nodecache.cache.layout import check_relative_path
from nodecache.cache.localdigest import LocalDigest
from nodecache.cache.uri import redact_uri

__all__ = [
    "IsolatedSettings",
    "RemoteFile",
    "Sink",
    "Source",
    "UnpackedFile",
    "finish_listing",
    "is_isolated",
    "isolate",
    "lookup_setting",
    "map_threads",
    "thread_buffer",
]

Sink = Callable[[int, memoryview], None]
"""``sink(offset, data)``: write ``data`` at ``offset`` of the destination file."""


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
    sha256: str | None = None
    """Hex sha256 the source publishes (a Hugging Face LFS oid, an OCI digest): compared
    with the sha256 the fetcher computes of every file anyway."""
    git_sha1: str | None = None
    """Hex git blob id the source publishes (Hugging Face non-LFS files): the sha1 of
    ``b"blob <size>\\0"`` and the content, folded as the bytes arrive."""
    crc: tuple[str, int] | None = None
    """``(algorithm, value)`` of a whole-object CRC the source publishes (``crc64nvme``,
    ``crc32c``, ``crc32``: S3 additional checksums, GCS crc32c): when set, the fetcher
    verifies the file by it instead of computing a sha256 or MD5 of every byte."""
    composite: CompositeCrc | None = None
    """An S3 COMPOSITE checksum (a multipart upload's CRC of its parts' CRCs) with the
    upload parts' sizes: verified per upload part, then as the composite."""
    digest: tuple[str, str] | None = None
    """``(algorithm, hex)`` of a whole-object hash that cannot be joined from parts
    (S3 ``xxhash3``, ``xxhash64``, ``xxhash128``, ``sha1``): folded in file order."""


@dataclass(frozen=True)
class UnpackedFile:
    """A model file a source made from verified fetched files (an image layer's entry)."""

    path: str
    size: int
    sha256: str
    """Of the bytes written, computed as they were."""
    local: LocalDigest
    """Its fast local digest, folded in the same pass (for ``nodecache verify``)."""


_NODE_FILE_KEYS = frozenset(
    {"AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG"}
    | {"GOOGLE_APPLICATION_CREDENTIALS", "SSL_CERT_DIR"}
)
_NODE_FILE_SUFFIXES = ("_FILE", "_PATH", "_CA_BUNDLE", "_CERT_DIR")


class IsolatedSettings(dict[str, str]):
    """The settings of a source opened isolated (a namespaced cache): these and nothing
    else. No fallback to the agent's environment, its files or its cloud identity, because
    a tenant names the endpoint and the platform's credentials must never go there."""


def is_isolated(credentials: Mapping[str, str] | None) -> bool:
    return isinstance(credentials, IsolatedSettings)


def isolate(credentials: Mapping[str, str] | None) -> IsolatedSettings:
    """``credentials`` as :class:`IsolatedSettings`; refuses a key that names a file on the
    node (the agent runs as root: a tenant would make it read the node's files)."""
    settings = IsolatedSettings(credentials or {})
    for name in sorted(settings):
        upper = name.upper()
        if upper in _NODE_FILE_KEYS or upper.endswith(_NODE_FILE_SUFFIXES):
            raise FetchError(
                f"storage setting {name} names a file on the node, which a namespaced cache "
                "cannot use: give the value itself in its Secret (keys, a service account "
                "JSON, a .dockerconfigjson), or use a cluster cache",
                permanent=True,
            )
    return settings


def lookup_setting(credentials: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set in ``credentials``, else in the environment: credentials
    from a Secret or a credentials file take precedence over the agent's own. Isolated
    settings never fall back to the environment."""
    for name in names:
        if credentials.get(name):
            return credentials[name]
    if is_isolated(credentials):
        return None
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


class Source(ABC):
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
        self.credentials: Mapping[str, str] = credentials if credentials is not None else {}

    @property
    def isolated(self) -> bool:
        """Opened for a namespaced cache: its own settings only, anonymous without any."""
        return is_isolated(self.credentials)

    def setting(self, *names: str) -> str | None:
        """The first of ``names`` set in the credentials given, else in the environment
        (unless isolated)."""
        return lookup_setting(self.credentials, *names)

    @property
    def resolved(self) -> str | None:
        """What a moving reference (branch, tag, alias) resolved to when listed, recorded in
        the manifest for status (``commit <sha>``, ``sha256:<digest>``); None where the URI
        names the bytes directly."""
        return None

    @abstractmethod
    def list_files(self) -> list[RemoteFile]:
        """Every object under the URI, checked by :func:`finish_listing`."""

    @abstractmethod
    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        """Deliver bytes ``[start, end)`` (to the end when ``end`` is None) to ``sink``.

        Returns the offset reached. Raises on error; bytes already delivered stay delivered,
        so a retry continues from the offset the sink has seen.
        """

    def unpack(
        self, folder: Path, *, file_mode: int, budget: WriteBudget, abort: threading.Event
    ) -> list[UnpackedFile] | None:
        """Make the model's files in ``folder`` from the fetched ones, once every one was
        verified; None where the fetched files are the model's (most sources). An image
        source unpacks its layers here, taking what it writes from ``budget`` and stopping
        when ``abort`` is set. Blocking."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: most sources hold nothing to release
        """Release connections. Safe to call more than once."""


def finish_listing(files: list[RemoteFile], uri: str) -> list[RemoteFile]:
    """``files`` sorted by path, once each refused if empty, unsafe, listed twice, or
    naming one path as both a file and a folder."""
    if not files:
        raise FetchError(f"no files found under {redact_uri(uri)}", permanent=True)
    files.sort(key=lambda f: f.path)
    seen: set[str] = set()
    for f in files:
        check_relative_path(f.path, uri)
        if f.path in seen:
            raise FetchError(f"{redact_uri(uri)} lists {f.path!r} twice", permanent=True)
        seen.add(f.path)
    for f in files:  # "a" as a file and "a/b" as a file cannot both exist on disk
        parent = posixpath.dirname(f.path)
        while parent:
            if parent in seen:
                raise FetchError(
                    f"{redact_uri(uri)} has both a file and a folder named {parent!r}",
                    permanent=True,
                )
            parent = posixpath.dirname(parent)
    return files


_BUFFERS = threading.local()


def thread_buffer(size: int) -> memoryview:
    """A per-thread reusable buffer of at least ``size`` bytes."""
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None or len(buf) < size:
        buf = memoryview(bytearray(size))
        _BUFFERS.buf = buf
    return buf[:size]


def map_threads(fn: Callable[[str], Any], items: list[str], workers: int = 8) -> list[Any]:
    """``[fn(i) for i in items]``, up to ``workers`` at a time (metadata requests)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))
