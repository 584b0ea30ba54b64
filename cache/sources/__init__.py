"""Sources: what a source URI lists, and reading byte ranges of its objects.

One module per kind of source over a small base (:mod:`.base`): ``file://``
(:mod:`.file`), ``http(s)://`` (:mod:`.http`), ``s3://`` (:mod:`.s3`, with s3fs as
:mod:`.s3fs_fallback`), ``gs://`` (:mod:`.gcs`). Listing and metadata go through fsspec
where a library does it well; the byte path is blocking ranged GETs, one keep-alive
connection per worker thread (:mod:`.httpclient`). Library errors become
:mod:`nodecache.cache.errors` in one place (:mod:`.errors`), with credentials masked.

To add a source: a module with a :class:`Source` subclass (``list_files``, ``read_range``,
``close``), its scheme in :func:`open_source` and in :data:`nodecache.cache.uri.SUPPORTED_SCHEMES`,
and a server for it in ``tests/test_source_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from nodecache.cache.azure_uri import is_blob_url
from nodecache.cache.errors import CacheError
from nodecache.cache.ociref import Mirror
from nodecache.cache.sources.azure import AzureSource
from nodecache.cache.sources.base import RemoteFile, Sink, Source, is_isolated, isolate
from nodecache.cache.sources.errors import (
    SourceHttpError,
    is_transient,
    mask_secrets,
    scrub,
    translate_error,
)
from nodecache.cache.sources.file import LocalSource
from nodecache.cache.sources.gcs import GcsSource
from nodecache.cache.sources.hf import HfSource
from nodecache.cache.sources.http import HttpSource
from nodecache.cache.sources.mlflow import MlflowSource
from nodecache.cache.sources.oci import OciSource
from nodecache.cache.sources.s3 import open_s3
from nodecache.cache.uri import validate_source_uri

__all__ = [
    "RemoteFile",
    "Sink",
    "Source",
    "SourceHttpError",
    "is_transient",
    "mask_secrets",
    "open_source",
    "scrub",
    "translate_error",
]

_KINDS: dict[str, Callable[..., Source]] = {
    "file": LocalSource,
    "http": HttpSource,
    "https": HttpSource,
    "s3": open_s3,
    "gs": GcsSource,
    "models": MlflowSource,
    "hf": HfSource,
    "az": AzureSource,
    "abfs": AzureSource,
    "abfss": AzureSource,
    "oci": OciSource,
}


def open_source(
    uri: str,
    *,
    chunk_size: int,
    timeout: float,
    credentials: Mapping[str, str] | None = None,
    registry_mirrors: Sequence[Mirror] = (),
    isolated: bool = False,
) -> Source:
    """Return the :class:`Source` for ``uri``. Blocking (imports, clients).

    ``credentials`` (from a Kubernetes Secret or a credentials file, resolved by the caller)
    take precedence over the environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
    ``AWS_SHARED_CREDENTIALS_FILE`` + ``AWS_PROFILE``, ``AWS_NO_SIGN_REQUEST``,
    ``AWS_CA_BUNDLE``; ``GOOGLE_APPLICATION_CREDENTIALS`` (a path),
    ``GOOGLE_SERVICE_ACCOUNT_JSON``, ``STORAGE_EMULATOR_HOST``; ``AZURE_STORAGE_*`` and
    Azure AD identities (:mod:`.azure`). ``registry_mirrors`` are tried first for
    ``oci://`` sources of their registry.

    ``isolated`` (a namespaced cache; kept by settings already isolated, as a source that
    opens another passes them on): ``credentials`` are all the source reads, never the
    environment, the node's files, botocore's chain, the Hugging Face token file, docker
    configs, credential helpers or a cloud identity; with none it is anonymous. A key
    naming a file on the node is refused.
    """
    if isolated or is_isolated(credentials):
        credentials = isolate(credentials)
    uri = validate_source_uri(uri)
    kind = AzureSource if is_blob_url(uri) else _KINDS[uri.split(":", 1)[0]]
    extra = {"mirrors": registry_mirrors} if kind is OciSource else {}
    try:
        return kind(uri, chunk_size=chunk_size, timeout=timeout, credentials=credentials, **extra)
    except CacheError:
        raise
    except Exception as exc:
        raise translate_error(exc, uri) from None
