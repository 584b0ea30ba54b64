"""``gs://`` sources: listing through gcsfs, bytes by ranged GETs of the JSON API."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

from nodecache.cache.checksums import crc_from_base64
from nodecache.cache.sources.base import RemoteFile, Sink
from nodecache.cache.sources.bucket import FsspecBucketSource
from nodecache.cache.sources.httpclient import HttpRanges

__all__ = ["GcsSource"]


class GcsSource(FsspecBucketSource):
    """``gs://``: listing through gcsfs; bytes by ranged ``GET``s of the JSON API's media
    download (``alt=media``, pinned to the listed generation) over our own keep-alive
    connections, with gcsfs's credentials (refreshed by it) in each request's headers.

    Through gcsfs each 4 MiB is a request of its own, hopping to fsspec's event-loop
    thread and back; here a part is one request streamed into the file like S3's.
    """

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        # gcsfs's plain filesystem, named explicitly: ``gcsfs.GCSFileSystem`` is its
        # experimental subclass unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, and that
        # one stalls every bucket call on a gRPC probe. No environment variable is changed.
        from gcsfs.core import GCSFileSystem

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
        elif self.isolated:  # never the node's application default credentials
            options["token"] = "anon"
        self.fs = GCSFileSystem(**options)
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
    def remote(path: str, info: dict[str, Any]) -> RemoteFile:
        """Verified by the object's ``crc32c`` (base64, big-endian), else its ``md5Hash``."""
        md5 = None
        if info.get("md5Hash"):
            try:
                md5 = base64.b64decode(info["md5Hash"]).hex()
            except ValueError:
                md5 = None
        crc = crc_from_base64("crc32c", info["crc32c"]) if info.get("crc32c") else None
        return RemoteFile(
            path,
            info["name"],
            int(info["size"]),
            etag=str(info.get("generation") or "") or None,
            md5=md5,
            crc=crc,
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
