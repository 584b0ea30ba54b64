"""``oci://`` sources: model files stored as blobs of an OCI registry (distribution spec).

Three kinds of artifact: a CNCF ModelPack (``artifactType``
``application/vnd.cncf.model.manifest.v1+json``; each ``.raw`` layer is the file its
``org.cncf.model.filepath`` names, or every layer is a ``.tar[+gzip]`` archive of paths
relative to the model, as ``modctl`` builds by default), an ORAS artifact (each layer named
by ``org.opencontainers.image.title``), and a KServe modelcar image: any other manifest none
of whose layers carries a title annotation. Its layers must be tar or tar+gzip image layers.
Archive layers are fetched as blobs, verified, and unpacked (a modelcar's ``/models`` only)
by :mod:`.modelcar` before the folder is published. The tag is resolved to a manifest digest
once, when the source is listed (:attr:`OciSource.digest`); every blob is then read by that
digest, so a tag moved during the download changes nothing. Blobs come through the shared
ranged fetcher and are verified against their sha256 digest as the bytes arrive
(``RemoteFile.sha256``).

Registry mirrors (``--registry-mirror HOST=MIRROR``: a pull-through cache, Spegel,
Dragonfly) are asked first, in order, for whatever is addressed by digest: a digest-pinned
manifest, an index's child, every blob; the digest check makes any mirror's answer safe. A
mirror that is refused or answers 404, 401 or 5xx (for a blob: before its first byte) is
passed over. A tag is resolved at HOST, which owns it; at a mirror only when HOST cannot
answer at all (refused, timeout, 5xx), never after HOST's own 404 or 401. containerd
resolves tags at mirrors too; we keep the tag's authority where it lives while HOST is up.

Loopback registries speak plain HTTP, as Docker allows; any other needs
``plainHTTP: "true"`` in the cache's storage parameters. Credentials: :mod:`.ociauth`; a
mirror gets its own login from the docker config, never HOST's.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import platform
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from nodecache.cache.budget import WriteBudget
from nodecache.cache.errors import FetchError, IntegrityError
from nodecache.cache.ociref import DOCKER_HUB, Mirror, OciRef, is_loopback, parse_oci_uri
from nodecache.cache.sources.base import (
    RemoteFile,
    Sink,
    Source,
    UnpackedFile,
    finish_listing,
)
from nodecache.cache.sources.errors import SourceHttpError, is_transient
from nodecache.cache.sources.httpclient import HttpRanges
from nodecache.cache.sources.modelcar import LAYERS_DIR, MODELS, Layer, tar_mode, unpack_layers
from nodecache.cache.sources.ociauth import RegistryAuth, find_login
from nodecache.cache.uri import redact_uri

__all__ = ["MODELPACK_ARTIFACT", "OciSource"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_PATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
_ORAS_UNPACK = "io.deis.oras.content.unpack"
# Every registry must be told it may answer OCI types: distribution 2.8 answers 404
# "OCI manifest found, but accept header does not support OCI manifests" otherwise.
_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
_MAX_MANIFEST = 4 * 1024 * 1024
"""Largest manifest read (containerd's limit)."""
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_MIRROR_FAILURES = (OSError, SourceHttpError, http.client.HTTPException)
"""What a mirror may fail with before the next endpoint is tried (refused, 404, 5xx, a
manifest whose bytes do not match its digest)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Endpoint:
    """One registry to ask for the repository: a mirror, or the registry the URI names."""

    name: str
    """``host[:port]``, for logs."""
    base: str
    """``scheme://host[:port]/v2/REPO``."""
    query: str
    """``?ns=HOST`` at a mirror (what containerd sends, so one mirror can serve many
    registries); empty at the registry itself."""
    auth: RegistryAuth
    mirror: bool

    def url(self, kind: str, reference: str) -> str:
        return f"{self.base}/{kind}/{reference}{self.query}"


class OciSource(Source):
    """``oci://HOST[:PORT]/REPO:TAG`` or ``...@sha256:DIGEST``: a ModelPack, an ORAS
    artifact or a modelcar image."""

    def __init__(self, uri: str, *, mirrors: Sequence[Mirror] = (), **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.ref: OciRef = parse_oci_uri(uri)
        plain = (self.setting("plainHTTP") or "").strip().lower() in ("true", "1", "yes")
        scheme = "http" if plain or is_loopback(self.ref.host) else "https"
        self.base = f"{scheme}://{self.ref.registry}/v2/{self.ref.repository}"
        self.http = HttpRanges(self.timeout, cafile=self.setting("REGISTRY_CA_BUNDLE"))
        login = find_login(self.ref.registry, self.credentials)
        self.auth = RegistryAuth(self.ref.registry, self.ref.repository, login, self._call)
        self.mirrors = [self._mirror(m) for m in mirrors if m.registry == self.ref.registry]
        """``--registry-mirror`` entries for this registry, in the order given."""
        self.endpoints = [
            *self.mirrors,
            _Endpoint(self.ref.registry, self.base, "", self.auth, mirror=False),
        ]
        """Where content addressed by digest is asked for: each mirror, then the registry."""
        self._blob_start: dict[str, int] = {}
        """Per blob digest, the first endpoint not yet seen failing for it."""
        self._start_lock = threading.Lock()
        self.digest: str | None = None
        """The manifest digest the reference resolved to (set by :meth:`list_files`)."""
        self.layers: list[tuple[str, str, str]] | None = None
        """Layers to unpack (blob path, media type, digest) in order, once listed: a
        modelcar's, or a ModelPack's tar archives."""
        self.within = MODELS
        """The archives' folder that is the model (``models``; ``""`` for a ModelPack)."""
        self._renew = threading.Lock()

    def _mirror(self, mirror: Mirror) -> _Endpoint:
        """A mirror's endpoint, with its own login (the registry's is never sent there)."""
        login = find_login(mirror.host, self.credentials)
        auth = RegistryAuth(mirror.host, self.ref.repository, login, self._call)
        namespace = "docker.io" if self.ref.registry == DOCKER_HUB else self.ref.registry
        base = f"{mirror.url}/v2/{self.ref.repository}"
        query = "?" + urlencode({"ns": namespace})
        return _Endpoint(mirror.host, base, query, auth, mirror=True)

    def close(self) -> None:
        self.http.close()

    @property
    def resolved(self) -> str | None:
        """What status shows: the manifest digest the tag (or digest) named when listed."""
        return self.digest

    def _call(self, method: str, url: str, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        return self.http.call(method, url, headers, limit=_MAX_MANIFEST)

    # -- manifests ------------------------------------------------------------------------

    def _get_manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        """The manifest ``reference`` names and its digest, checked against the bytes.

        By digest: from the first mirror that has it, else the registry (the digest makes
        any answer safe). By tag: from the registry, which owns the tag; a mirror resolves
        it only when the registry cannot answer at all (refused, timeout, 5xx), never when
        it answered 404 or 401.
        """
        by_digest = reference.startswith("sha256:")
        registry = self.endpoints[-1]
        if by_digest:
            for mirror in self.mirrors:
                try:
                    return self._manifest_at(mirror, reference)
                except _MIRROR_FAILURES as exc:
                    _passed_over(mirror, exc)
            return self._manifest_at(registry, reference)
        try:
            return self._manifest_at(registry, reference)
        except _MIRROR_FAILURES as exc:
            if not self.mirrors or not is_transient(exc):
                raise
            for mirror in self.mirrors:
                try:
                    return self._manifest_at(mirror, reference)
                except _MIRROR_FAILURES as failure:
                    _passed_over(mirror, failure)
            raise

    def _manifest_at(self, where: _Endpoint, reference: str) -> tuple[dict[str, Any], str]:
        url = where.url("manifests", reference)
        for _ in range(3):
            sent = where.auth.headers()
            headers = {"Accept": _ACCEPT, "User-Agent": "nodecache", **sent}
            status, resp, body = self._call("GET", url, headers)
            if status == 401:
                where.auth.challenged(resp.getheader("WWW-Authenticate"), sent.get("Authorization"))
                continue
            break
        if status != 200:
            raise _registry_error(status, body, self.ref)
        if len(body) > _MAX_MANIFEST:
            raise FetchError(
                f"{redact_uri(self.uri)}: manifest larger than {_MAX_MANIFEST} bytes",
                permanent=True,
            )
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        announced = resp.getheader("Docker-Content-Digest")
        expected = reference if reference.startswith("sha256:") else announced
        if expected and expected.startswith("sha256:") and expected != digest:
            raise IntegrityError(
                f"{redact_uri(self.uri)}: the manifest's bytes hash to {digest}, "
                f"not the {expected} the registry names"
            )
        try:
            manifest = json.loads(body)
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            raise FetchError(f"{redact_uri(self.uri)}: the manifest is not JSON", permanent=True)
        return manifest, digest

    def _resolve(self) -> dict[str, Any]:
        """The image manifest, through an index if the reference names one."""
        manifest, digest = self._get_manifest(self.ref.reference)
        self.digest = digest
        kind = manifest.get("mediaType")
        if kind in (OCI_INDEX, DOCKER_LIST) or "manifests" in manifest:
            child = _pick_platform(manifest.get("manifests"), self.uri)
            manifest, _ = self._get_manifest(child)
        return manifest

    def list_files(self) -> list[RemoteFile]:
        manifest = self._resolve()
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise FetchError(
                f"{redact_uri(self.uri)}: the manifest lists no layers", permanent=True
            )
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        modelpack = (
            manifest.get("artifactType") == MODELPACK_ARTIFACT
            or config.get("mediaType") == MODELPACK_CONFIG
        )
        if modelpack and any(".tar" in _media(layer) for layer in layers):
            return self._layer_blobs(layers, within="")
        if not modelpack and not any(_title(layer) for layer in layers):
            return self._layer_blobs(layers, within=MODELS)
        key = MODELPACK_PATH if modelpack else TITLE
        files = [self._remote(layer, key) for layer in layers]
        return finish_listing(files, self.uri)

    def _layer_blobs(self, layers: list[Any], *, within: str) -> list[RemoteFile]:
        """Archive layers (a modelcar's, a tar ModelPack's), to fetch into the partial
        folder's scratch blobs and unpack: what is under ``within`` is the model."""
        where = redact_uri(self.uri)
        files, self.layers, self.within = [], [], within
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise FetchError(
                    f"{where}: a layer of the manifest is not an object", permanent=True
                )
            digest, size = _digest_and_size(layer, f"layer {i}", where)
            media = _media(layer)
            if tar_mode(media) is None:
                hint = "; push it with gzip layers" if "zstd" in media else ""
                what = (
                    "every layer of a ModelPack with archives must be a tar or tar+gzip "
                    "archive (or every layer a raw file: modctl --raw)"
                    if not within
                    else "neither a file with a title annotation (ORAS) nor a tar or "
                    "tar+gzip image layer (modelcar)"
                )
                raise FetchError(
                    f"{where}: layer {digest[:19]} has media type {media!r}: {what}{hint}",
                    permanent=True,
                )
            hexdigest = digest[len("sha256:") :]
            path = f"{LAYERS_DIR}/{i:04d}-{hexdigest[:16]}"
            files.append(RemoteFile(path, digest, size, etag=digest, sha256=hexdigest))
            self.layers.append((path, media, digest))
        return files

    def unpack(
        self, folder: Path, *, file_mode: int, budget: WriteBudget, abort: threading.Event
    ) -> list[UnpackedFile] | None:
        """A modelcar's verified layers unpacked into the model folder (only ``/models``);
        None for the other kinds, whose fetched files are the model."""
        if self.layers is None:
            return None
        layers = [Layer(folder / path, media, digest) for path, media, digest in self.layers]
        return unpack_layers(
            folder,
            layers,
            uri=redact_uri(self.uri),
            file_mode=file_mode,
            budget=budget,
            abort=abort,
            within=self.within,
        )

    def _remote(self, layer: Any, key: str) -> RemoteFile:
        where = redact_uri(self.uri)
        if not isinstance(layer, dict):
            raise FetchError(f"{where}: a layer of the manifest is not an object", permanent=True)
        annotations = layer.get("annotations") or {}
        path = annotations.get(key) if isinstance(annotations, dict) else None
        if not isinstance(path, str) or not path:
            raise FetchError(
                f"{where}: a layer has no {key} annotation, which every layer of a "
                "ModelPack or ORAS artifact carries to name its file",
                permanent=True,
            )
        # ORAS names plain files ``...layer.v1.tar`` too: only its unpack annotation marks
        # an archive (a folder pushed whole). A ModelPack's archives never come here.
        if annotations.get(_ORAS_UNPACK) == "true":
            raise FetchError(
                f"{where}: layer {path!r} is an archive of a folder ({_media(layer)}); "
                "unpacking ORAS folders is not supported yet: push the files themselves "
                "(oras push FILE ...)",
                permanent=True,
            )
        digest, size = _digest_and_size(layer, f"layer {path!r}", where)
        return RemoteFile(path, digest, size, etag=digest, sha256=digest[len("sha256:") :])

    # -- blobs ----------------------------------------------------------------------------

    def read_range(self, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        """From the first endpoint that has the blob: a mirror that fails before sending a
        byte is passed over (for this blob, from then on); one that fails after some bytes
        is retried like any source."""
        with self._start_lock:
            first = self._blob_start.get(remote.url, 0)
        for index in range(first, len(self.endpoints)):
            where = self.endpoints[index]
            sent = 0

            def counting(offset: int, data: memoryview) -> None:
                nonlocal sent
                sent += len(data)
                sink(offset, data)

            try:  # the registry itself: bytes straight to the sink, its errors raised
                return self._read_at(where, remote, start, end, counting if where.mirror else sink)
            except _MIRROR_FAILURES as exc:
                if not where.mirror or sent:
                    raise
                _passed_over(where, exc)
                with self._start_lock:
                    self._blob_start[remote.url] = max(
                        self._blob_start.get(remote.url, 0), index + 1
                    )
        raise AssertionError("unreachable: the registry itself raises")

    def _read_at(
        self, where: _Endpoint, remote: RemoteFile, start: int, end: int | None, sink: Sink
    ) -> int:
        url = where.url("blobs", remote.url)
        for attempt in range(2):
            sent = where.auth.headers().get("Authorization")
            try:
                return self.http.get(
                    url,
                    start,
                    end,
                    sink,
                    chunk_size=self.chunk_size,
                    sign=lambda _method, _url: where.auth.headers(),
                    size=remote.size,
                )
            except SourceHttpError as exc:
                # A 401 comes before any byte: a token ran out mid-download. Renew it once.
                if exc.status != 401 or attempt:
                    raise
                with self._renew:
                    self._challenge_blob(where, url, sent)
        raise AssertionError("unreachable")

    def _challenge_blob(self, where: _Endpoint, url: str, sent: str | None) -> None:
        """Fetch the blob's challenge (a ``HEAD``) and renew the credentials from it."""
        status, resp, _ = self._call("HEAD", url, {"User-Agent": "nodecache"})
        if status == 401:
            where.auth.challenged(resp.getheader("WWW-Authenticate"), sent)


def _passed_over(mirror: _Endpoint, exc: BaseException) -> None:
    log.info("registry mirror %s failed (%s); trying the next", mirror.name, type(exc).__name__)


def _media(layer: Any) -> str:
    return str(layer.get("mediaType") or "") if isinstance(layer, dict) else ""


def _title(layer: Any) -> bool:
    """Whether a layer names its file (an ORAS artifact's layers all do)."""
    annotations = layer.get("annotations") if isinstance(layer, dict) else None
    return isinstance(annotations, dict) and bool(annotations.get(TITLE))


def _digest_and_size(layer: dict[str, Any], name: str, where: str) -> tuple[str, int]:
    """A layer's sha256 digest and size, checked."""
    digest, size = layer.get("digest"), layer.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise FetchError(f"{where}: {name} has no sha256 digest", permanent=True)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FetchError(f"{where}: {name} has no valid size", permanent=True)
    return digest, size


def _registry_error(status: int, body: bytes, ref: OciRef) -> SourceHttpError:
    """The registry's own error code (distribution spec ``errors[]``) and a hint."""
    code, message = "", ""
    try:
        first = json.loads(body)["errors"][0]
        code, message = str(first.get("code", ""))[:60], str(first.get("message", ""))[:200]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass
    if status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"):
        message = f"no {ref.reference} in {ref.registry}/{ref.repository}"
    return SourceHttpError(status, code, message)


def _pick_platform(manifests: Any, uri: str) -> str:
    """The digest of the index entry for this machine (``linux``/its architecture), or of
    the only entry."""
    where = redact_uri(uri)
    if not isinstance(manifests, list) or not manifests:
        raise FetchError(f"{where}: the image index lists no manifests", permanent=True)
    entries = [
        m for m in manifests if isinstance(m, dict) and _DIGEST.fullmatch(str(m.get("digest")))
    ]
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    if len(entries) == 1 and not isinstance(entries[0].get("platform"), dict):
        return str(entries[0]["digest"])
    for entry in entries:
        plat = entry.get("platform")
        if (
            isinstance(plat, dict)
            and plat.get("architecture") == arch
            and (plat.get("os") in (None, "linux"))
        ):
            return str(entry["digest"])
    offered = sorted(
        f"{p.get('os')}/{p.get('architecture')}"
        for p in (e.get("platform") for e in entries)
        if isinstance(p, dict)
    )
    raise FetchError(
        f"{where}: the image index has no linux/{arch} manifest (it has {offered})",
        permanent=True,
    )
