"""``s3://`` through s3fs, where the signed fast path (:mod:`.s3`) cannot go."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from nodecache.cache.sources.base import RemoteFile, Sink
from nodecache.cache.sources.bucket import FsspecBucketSource
from nodecache.cache.sources.httpclient import HttpRanges
from nodecache.cache.sources.s3common import S3Settings, resolve_s3_settings, s3_remote

__all__ = ["S3fsSource"]


class S3fsSource(FsspecBucketSource):
    """``s3://`` through s3fs: listing through s3fs, bytes through presigned ranged GETs.

    Used only where :class:`~nodecache.cache.sources.s3.S3Source` cannot go: a bucket name
    that cannot be virtual-hosted on AWS, anonymous access with no region to sign for, or no
    credentials found by botocore's chain (s3fs then reports what it finds).
    """

    def __init__(self, uri: str, *, settings: S3Settings | None = None, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        import s3fs

        settings = settings or resolve_s3_settings(self.credentials)
        options: dict[str, Any] = {}
        if settings.endpoint:
            options["endpoint_url"] = settings.endpoint
        if settings.anon:
            options["anon"] = True
        else:
            if settings.has_keys:
                options.update(key=settings.key, secret=settings.secret, token=settings.token)
            if settings.region:
                options["client_kwargs"] = {"region_name": settings.region}
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
        self.anon = settings.anon
        self.endpoint = settings.endpoint or "https://s3.amazonaws.com"
        self.root = uri[len("s3://") :]
        self.http = HttpRanges(self.timeout)

    def close(self) -> None:
        self.http.close()

    remote = staticmethod(s3_remote)

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
