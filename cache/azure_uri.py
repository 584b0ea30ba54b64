"""Azure Blob URIs, parsed once: ``az://CONTAINER/PATH``,
``abfs[s]://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH`` and
``https://ACCOUNT.blob.core.windows.net/CONTAINER/PATH``.

Both :mod:`nodecache.cache.uri` (validation, and routing the ``https`` host form away from
the plain HTTP source) and the Azure source use it, so what is accepted is what is fetched.
In ``abfs`` the ``CONTAINER@`` is a container name, not user info: it is neither refused as
embedded credentials nor masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from nodecache.cache.errors import InvalidSourceError

__all__ = ["AZURE_SCHEMES", "AzureLocation", "is_blob_url", "parse_azure_uri"]

AZURE_SCHEMES = ("az", "abfs", "abfss")
"""Schemes that always name Azure Blob Storage (``https`` does for blob hosts only)."""
_SUFFIXES = ("core.windows.net", "core.chinacloudapi.cn", "core.usgovcloudapi.net")
"""Endpoint suffixes of Azure's public, China and US Government clouds."""
_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
# Container names: 3-63 lowercase letters, digits and single hyphens; $root/$web are Azure's.
_CONTAINER = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]|\$root|\$web")
_HOST = re.compile(
    r"(?P<account>[^.]+)\.(?P<service>blob|dfs)\.(?P<suffix>"
    + "|".join(re.escape(s) for s in _SUFFIXES)
    + r")"
)


@dataclass(frozen=True)
class AzureLocation:
    """Where an Azure Blob URI points."""

    container: str
    path: str
    """Blob name or folder prefix inside the container, no leading or trailing ``/``."""
    account: str | None
    """None for ``az://``: the account comes from the credentials or the environment."""
    suffix: str = _SUFFIXES[0]
    """Endpoint suffix of the account's cloud (``core.windows.net``)."""


def is_blob_url(uri: str) -> bool:
    """Whether ``uri`` is an ``https://ACCOUNT.blob.<cloud suffix>/...`` URL (Azure Blob)."""
    try:
        parts = urlsplit(uri.strip())
        host = parts.hostname or ""
    except ValueError:
        return False
    match = _HOST.fullmatch(host)
    return parts.scheme.lower() == "https" and match is not None and match["service"] == "blob"


def parse_azure_uri(uri: str, shown: str) -> tuple[str, AzureLocation]:
    """(normal form, location) of an Azure Blob URI, or :class:`InvalidSourceError`.

    ``shown`` is the URI as error messages may show it (redacted).
    """
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidSourceError(f"malformed source URI {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if parts.query:
        raise InvalidSourceError(
            f"unexpected '?' query in Azure URI {shown!r}; pass a SAS token as "
            "AZURE_STORAGE_SAS_TOKEN (environment or the storage secret), not in the URI"
        )
    if parts.fragment:
        raise InvalidSourceError(f"unexpected '#' fragment in source URI {shown!r}")
    if port is not None:
        raise InvalidSourceError(
            f"unexpected port in Azure URI {shown!r}; point AZURE_STORAGE_ENDPOINT or a "
            "connection string's BlobEndpoint at another endpoint"
        )
    segments = parts.path.strip("/")
    if scheme == "az":
        container, account, suffix = parts.netloc, None, _SUFFIXES[0]
        rest = segments
    else:
        host = parts.netloc.rpartition("@")[2].lower()
        match = _HOST.fullmatch(host)
        if match is None:
            raise InvalidSourceError(
                f"Azure URI {shown!r} names host {host!r}; expected "
                + (
                    "ACCOUNT.blob.core.windows.net"
                    if scheme == "https"
                    else "CONTAINER@ACCOUNT.dfs.core.windows.net"
                )
            )
        account, suffix = match["account"], match["suffix"]
        if scheme == "https":
            if "@" in parts.netloc:
                raise InvalidSourceError(
                    f"credentials embedded in source URI {shown!r}; "
                    "pass them through the storage credentials reference instead"
                )
            container, _, rest = segments.partition("/")
        else:
            container, at, _ = parts.netloc.rpartition("@")
            if ":" in container:
                raise InvalidSourceError(
                    f"credentials embedded in source URI {shown!r}; "
                    "pass them through the storage credentials reference instead"
                )
            if not at:
                raise InvalidSourceError(
                    f"missing container in Azure URI {shown!r}; write "
                    f"'{scheme}://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH'"
                )
            rest = segments
        if not _ACCOUNT.fullmatch(account):
            raise InvalidSourceError(
                f"invalid storage account name {account!r} in {shown!r}; "
                "use 3-24 lowercase letters and digits"
            )
    if not _CONTAINER.fullmatch(container):
        raise InvalidSourceError(
            f"invalid container name {container!r} in Azure URI {shown!r}; use 3-63 "
            "lowercase letters, digits and single '-'"
        )
    if not rest:
        raise InvalidSourceError(
            f"missing path in source URI {shown!r}; name a blob or a folder in the container"
        )
    if "//" in rest:
        raise InvalidSourceError(f"empty path segment in source URI {shown!r}")
    for segment in rest.split("/"):
        if segment in (".", ".."):
            raise InvalidSourceError(f"'{segment}' path segment in source URI {shown!r}")
    location = AzureLocation(container, rest, account, suffix)
    if scheme == "az":
        normal = f"az://{container}/{rest}"
    elif scheme == "https":
        normal = f"https://{account}.blob.{suffix}/{container}/{rest}"
    else:
        netloc = f"{container}@{parts.netloc.rpartition('@')[2].lower()}"
        normal = SplitResult(scheme, netloc, "/" + rest, "", "").geturl()
    return normal, location
