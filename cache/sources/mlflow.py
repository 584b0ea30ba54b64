"""``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` from the MLflow Model Registry.

The registry is only a name: its REST API (``MLFLOW_TRACKING_URI``, no ``mlflow`` package,
which is over 800 MB) resolves the alias to a version once, and the version to the place
its artifacts live. Bytes then come from there: through the tracking server's artifact
proxy for ``mlflow-artifacts:`` locations (listed one level at a time, read with Range),
or through the source of that location's own scheme (``s3://``, ``gs://``, ``http(s)://``)
with the same credentials.

The proxy publishes no checksum: its files are checked by size, and the sha256 the fetcher
computes of every file is recorded in the manifest at first download. Files of another
location keep every check their own source lists (an S3 object's CRC, an MD5): status names
the one the fetcher applies (:attr:`verified_by`, by the fetcher's own rule).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import posixpath
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from nodecache.cache.checksums import describe_checks
from nodecache.cache.errors import FetchError, InvalidSourceError
from nodecache.cache.models_uri import parse_models_uri
from nodecache.cache.sources.base import RemoteFile, Sink, Source, finish_listing
from nodecache.cache.sources.errors import SourceHttpError, scrub, translate_error
from nodecache.cache.sources.httpclient import HttpRanges
from nodecache.cache.uri import redact_uri

__all__ = ["MlflowSource"]

log = logging.getLogger(__name__)

_API = "/api/2.0/mlflow"
_PROXY = "/api/2.0/mlflow-artifacts/artifacts"
_MAX_ENTRIES = 100_000
_MAX_DEPTH = 64
_MAX_HOPS = 4
"""``runs:/`` locations resolved in a row before giving up (a run's URI is never another
run's, but a hostile server may say so)."""


class MlflowSource(Source):
    """A registered model version: resolved on the first :meth:`list_files`, then read
    through the artifact proxy or delegated to the source of its artifact location.

    After listing, :attr:`version` is the version the URI resolved to and
    :attr:`location` where its artifacts are (for status and logs).
    """

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.model = parse_models_uri(uri, redact_uri(uri))
        tracking = self.setting("MLFLOW_TRACKING_URI")
        if not tracking:
            raise InvalidSourceError(f"{uri} needs MLFLOW_TRACKING_URI (the tracking server)")
        parts = urlsplit(tracking.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidSourceError(
                f"MLFLOW_TRACKING_URI {redact_uri(tracking)!r} is not an http(s) tracking "
                "server; models:/ URIs are resolved through a server's REST API"
            )
        if "@" in parts.netloc or parts.query:
            raise InvalidSourceError(
                f"MLFLOW_TRACKING_URI {redact_uri(tracking)!r} carries credentials; set "
                "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD instead"
            )
        self.tracking = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.origin = (parts.scheme, parts.netloc.lower())
        self.auth = self._auth_header()
        self.http = HttpRanges(
            self.timeout, cafile=self.setting("MLFLOW_TRACKING_SERVER_CERT_PATH")
        )
        self.version: str | None = None
        self.location: str | None = None
        self.inner: Source | None = None
        self.proxy_root: str | None = None
        """Base URL of the artifact proxy when the location is ``mlflow-artifacts:``."""
        self.files: dict[str, RemoteFile] = {}
        """What the inner source listed, by path: read with its own ETag and URL."""

    @property
    def verified_by(self) -> str:
        """How the bytes are checked, as the fetcher checks them: what the location
        publishes (an S3 object's CRC, an MD5, ...), or size plus the sha256 recorded at
        first download where it publishes nothing (the artifact proxy)."""
        if self.inner is not None and self.location is not None:
            store = self.location.partition(":")[0].lower()
            return describe_checks(list(self.files.values()), f"the artifact store ({store})")
        return "size; sha256 recorded at first download (the source publishes no checksum)"

    @property
    def resolved(self) -> str | None:
        """The version (an alias resolves to one) and how its bytes are checked, for status."""
        if self.version is None:
            return None
        return f"version {self.version}, checked by {self.verified_by}"

    def _auth_header(self) -> dict[str, str]:
        token = self.setting("MLFLOW_TRACKING_TOKEN")
        if token:
            return {"Authorization": f"Bearer {token}"}
        user = self.setting("MLFLOW_TRACKING_USERNAME")
        password = self.setting("MLFLOW_TRACKING_PASSWORD")
        if user and password:
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        return {}

    def close(self) -> None:
        self.http.close()
        if self.inner is not None:
            self.inner.close()

    # -- the registry ---------------------------------------------------------------------

    def _sign(self, method: str, url: str) -> dict[str, str]:
        """The tracking server's credentials, for the tracking server's origin only."""
        parts = urlsplit(url)
        return self.auth if (parts.scheme, parts.netloc.lower()) == self.origin else {}

    def _json_headers(self, url: str) -> dict[str, str]:
        return {"Accept": "application/json", "User-Agent": "nodecache", **self._sign("GET", url)}

    def _get_json(self, path: str, **query: str) -> dict[str, Any]:
        url = f"{self.tracking}{path}?{urlencode(query)}" if query else f"{self.tracking}{path}"
        status, _, body = self.http.call("GET", url, self._json_headers(url))
        if status != 200:
            raise _mlflow_error(status, body)
        try:
            doc = json.loads(body)
        except ValueError:
            raise FetchError(
                f"{self.uri}: {redact_uri(self.tracking)} answered {path} with something "
                "that is not JSON; is MLFLOW_TRACKING_URI an MLflow tracking server?",
                permanent=True,
            ) from None
        if not isinstance(doc, dict):
            raise self._malformed(path)
        return doc

    def _malformed(self, what: str) -> FetchError:
        return FetchError(
            f"{self.uri}: the tracking server's answer to {what} is malformed", permanent=True
        )

    def _resolve(self) -> str:
        """The version (an alias once) and its artifact location."""
        name = self.model.name
        version = self.version or self.model.version  # an alias resolves once, even on retry
        if version is None:
            doc = self._get_json(
                f"{_API}/registered-models/alias", name=name, alias=self.model.alias or ""
            )
            version = _field(doc, "model_version", "version")
            if not isinstance(version, str | int) or not str(version).isdecimal():
                raise self._malformed("registered-models/alias")
            version = self.version = str(version)
        doc = self._get_json(f"{_API}/model-versions/get", name=name, version=version)
        state = _field(doc, "model_version", "status")
        if state == "PENDING_REGISTRATION":
            raise FetchError(f"{self.uri}: version {version} is still being registered")
        if state not in (None, "READY"):
            raise FetchError(f"{self.uri}: version {version} is {state}", permanent=True)
        doc = self._get_json(f"{_API}/model-versions/get-download-uri", name=name, version=version)
        location = doc.get("artifact_uri")
        if not isinstance(location, str) or not location:
            raise self._malformed("model-versions/get-download-uri")
        self.version = version
        for _ in range(_MAX_HOPS):
            if not location.startswith("runs:/"):
                return location
            location = self._run_location(location)
        raise FetchError(f"{self.uri}: too many runs:/ indirections", permanent=True)

    def _run_location(self, location: str) -> str:
        """``runs:/RUN_ID/PATH`` as the run's artifact URI plus PATH."""
        run_id, _, path = location[len("runs:/") :].partition("/")
        if not run_id:
            raise FetchError(f"{self.uri}: malformed run location {location!r}", permanent=True)
        doc = self._get_json(f"{_API}/runs/get", run_id=run_id)
        root = _field(doc, "run", "info", "artifact_uri")
        if not isinstance(root, str) or not root:
            raise self._malformed("runs/get")
        return root.rstrip("/") + ("/" + path.strip("/") if path.strip("/") else "")

    # -- listing and reading --------------------------------------------------------------

    def list_files(self) -> list[RemoteFile]:
        try:
            return self._list()
        except SourceHttpError as exc:  # the registry's or the proxy's answer, said here
            raise translate_error(exc, self.uri) from None

    def _list(self) -> list[RemoteFile]:
        if self.location is None:
            self.location = self._resolve()
            log.info(
                "%s resolved to version %s at %s",
                self.uri,
                self.version,
                redact_uri(self.location),
            )
        if self.location.startswith("mlflow-artifacts:"):
            return finish_listing(self._list_proxy(self.location), self.uri)
        if self.inner is None:
            self.inner = self._open_location(self.location)
        listed = self.inner.list_files()
        self.files = {f.path: f for f in listed}
        # The journal resumes a part only if its file's ETag is unchanged: the version in
        # it means parts of another version (an alias that moved) are never reused.
        # Every check the location publishes (CRC, MD5, ...) goes through as listed.
        return finish_listing(
            [dataclasses.replace(f, etag=f"v{self.version}:{f.etag or ''}") for f in listed],
            self.uri,
        )

    def _open_location(self, location: str) -> Source:
        from nodecache.cache.sources import open_source  # the scheme table; imports this

        scheme = location.partition(":")[0].lower()
        if scheme in ("file", "models", "runs") or "://" not in location:
            raise FetchError(
                f"{self.uri}: version {self.version} lives at {redact_uri(location)!r}, which "
                "this node cannot read (a path on the tracking server's machine, or another "
                "registry); serve artifacts through the tracking server (--serve-artifacts) "
                "or an object store",
                permanent=True,
            )
        return open_source(
            location, chunk_size=self.chunk_size, timeout=self.timeout, credentials=self.credentials
        )

    def _proxy_base(self, location: str) -> tuple[str, str]:
        """(base URL of the artifact proxy, path under it) of an ``mlflow-artifacts:`` URI.

        ``mlflow-artifacts:/P`` is served by the tracking server itself;
        ``mlflow-artifacts://HOST[:PORT]/P`` by another server, reached with the tracking
        URI's scheme (and without its credentials, unless it is the same origin).
        """
        rest = location[len("mlflow-artifacts:") :]
        if rest.startswith("//"):
            netloc, _, path = rest[2:].partition("/")
            if not netloc or "@" in netloc:
                raise FetchError(f"{self.uri}: malformed location {rest!r}", permanent=True)
            base = f"{self.origin[0]}://{netloc}{_PROXY}"
        else:
            path = rest
            base = f"{self.tracking}{_PROXY}"
        path = path.strip("/")
        if any(s in ("..", ".") for s in path.split("/")):
            raise FetchError(f"{self.uri}: unsafe artifact location {path!r}", permanent=True)
        return base, path

    def _list_proxy(self, location: str) -> list[RemoteFile]:
        base, root = self._proxy_base(location)
        self.proxy_root = base
        files: list[RemoteFile] = []
        folders = [""]
        depth = 0
        while folders:
            depth += 1
            if depth > _MAX_DEPTH:
                raise FetchError(f"{self.uri}: artifact folders nest too deep", permanent=True)
            below: list[str] = []
            for rel in folders:
                for name, is_dir, size in self._list_one(base, _join(root, rel)):
                    path = _join(rel, name)
                    if is_dir:
                        below.append(path)
                    else:
                        url = f"{base}/{quote(_join(root, path))}"
                        # The version as the ETag: see list_files (the proxy publishes none).
                        files.append(
                            RemoteFile(path, url, size, f"v{self.version}", ranges=size is not None)
                        )
                if len(files) + len(below) > _MAX_ENTRIES:
                    raise FetchError(f"{self.uri} lists too many artifacts", permanent=True)
            folders = below
        if not files:  # a folder lists its files; a single file lists nothing, as in MLflow
            files.append(self._single_file(base, root, location))
        return files

    def _single_file(self, base: str, root: str, location: str) -> RemoteFile:
        """The location as one file, sized by a one-byte ranged GET (the proxy has no HEAD)."""
        url = f"{base}/{quote(root)}"
        headers = {"Range": "bytes=0-0", "User-Agent": "nodecache", **self._sign("GET", url)}
        status, resp, body = self.http.call("GET", url, headers)
        if status == 404 or not root:
            raise FetchError(
                f"{self.uri}: version {self.version} has no artifacts at {redact_uri(location)}",
                permanent=True,
            )
        if status not in (200, 206):
            raise _mlflow_error(status, body)
        total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
        if status == 200:
            total = resp.getheader("Content-Length") or ""
        if not total.isdecimal():
            raise self._malformed("a ranged read")
        return RemoteFile(posixpath.basename(root), url, int(total), f"v{self.version}")

    def _list_one(self, base: str, path: str) -> list[tuple[str, bool, int | None]]:
        """One level of the proxy's listing: (name, is a folder, size)."""
        url = f"{base}?{urlencode({'path': path})}" if path else base
        status, _, body = self.http.call("GET", url, self._json_headers(url))
        if status != 200:
            raise _mlflow_error(status, body)
        try:
            entries = json.loads(body).get("files", [])
        except (ValueError, AttributeError):
            raise self._malformed("an artifact listing") from None
        if not isinstance(entries, list):
            raise self._malformed("an artifact listing")
        out: list[tuple[str, bool, int | None]] = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise self._malformed("an artifact listing")
            name = entry["path"]
            if "/" in name and path and name.startswith(path + "/"):
                name = name[len(path) + 1 :]  # servers that answer with the full path
            if not name or "/" in name or name in (".", ".."):
                raise FetchError(
                    f"{self.uri}: unsafe artifact name {name!r} under {path!r}", permanent=True
                )
            size = entry.get("file_size")
            if isinstance(size, str) and size.isdecimal():
                size = int(size)
            if size is not None and (not isinstance(size, int) or size < 0):
                raise self._malformed("an artifact listing")
            out.append((name, entry.get("is_dir") is True, size))
        return out

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        if self.inner is not None:
            return self.inner.read_range(self.files[remote.path], start, end, sink)
        return self.http.get(
            remote.url,
            start,
            end,
            sink,
            chunk_size=self.chunk_size,
            sign=self._sign,
            size=remote.size,
        )


def _join(a: str, b: str) -> str:
    return posixpath.join(a, b) if a and b else a or b


def _field(doc: dict[str, Any], *keys: str) -> Any:
    """``doc[k1][k2]...``, or None where a level is missing or not an object."""
    value: Any = doc
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _mlflow_error(status: int, body: bytes) -> SourceHttpError:
    """An MLflow error answer (``{"error_code", "message"}``) as a :class:`SourceHttpError`;
    the message is the server's, scrubbed of anything URL-shaped."""
    code, message = "", ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            code = str(doc.get("error_code") or "")[:100]
            message = str(doc.get("message") or "")[:300]
    except ValueError:
        pass
    if status in (401, 403) and not message:
        message = (
            "the tracking server refused the credentials; check MLFLOW_TRACKING_TOKEN or "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
        )
    return SourceHttpError(status, code, scrub(message))
