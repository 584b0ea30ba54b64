"""What both S3 sources share: one resolution of where and as whom a bucket is read, and
how a listed object becomes a :class:`RemoteFile`."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nodecache.cache.checksums import (
    CRCS,
    STREAMS,
    CompositeCrc,
    composite_from_base64,
    crc_from_base64,
    stream_from_base64,
)
from nodecache.cache.errors import FetchError
from nodecache.cache.sources.base import RemoteFile, is_isolated, lookup_setting

__all__ = [
    "CHECKSUM_NAMES",
    "COMPOSITE_NAMES",
    "Refresh",
    "S3Settings",
    "composite_layout_needed",
    "credential_chain",
    "parse_object_parts",
    "resolve_s3_settings",
    "s3_remote",
]

log = logging.getLogger(__name__)

Refresh = Callable[[], tuple[str, str, str | None]]
"""Returns the current (key, secret, token), renewed by botocore before they expire."""


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom an S3 source is read, from the credentials given (a Secret or a
    credentials file) and else the environment. Resolved once per source."""

    endpoint: str
    """``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``/``S3_ENDPOINT`` with a scheme, or ""
    for AWS itself."""
    region: str | None
    """``AWS_REGION``/``AWS_DEFAULT_REGION`` as given; None when not configured."""
    key: str | None
    secret: str | None
    token: str | None
    anon: bool
    """``AWS_NO_SIGN_REQUEST``: unsigned requests, credentials ignored."""
    profile: str | None
    """``AWS_PROFILE``, for botocore's chain when no keys were given."""
    ca_bundle: str | None
    """``AWS_CA_BUNDLE``: certificates for a private endpoint."""

    @property
    def has_keys(self) -> bool:
        return bool(self.key and self.secret)


def resolve_s3_settings(credentials: Mapping[str, str]) -> S3Settings:
    """The :class:`S3Settings` of ``credentials`` (and the environment). A shared
    credentials file given with the credentials (``AWS_SHARED_CREDENTIALS_FILE`` +
    ``AWS_PROFILE``) is read here, unless keys were given as values. Isolated settings
    without keys are anonymous (never botocore's chain: the node's role)."""
    isolated = is_isolated(credentials)

    def setting(*names: str) -> str | None:
        return lookup_setting(credentials, *names)

    key = setting("AWS_ACCESS_KEY_ID")
    secret = setting("AWS_SECRET_ACCESS_KEY")
    token = setting("AWS_SESSION_TOKEN")
    shared = credentials.get("AWS_SHARED_CREDENTIALS_FILE")
    if shared and not isolated and not credentials.get("AWS_ACCESS_KEY_ID"):
        key, secret, token = _read_credentials_file(
            shared, credentials.get("AWS_PROFILE") or "default"
        )
    endpoint = setting("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT") or ""
    if endpoint and "://" not in endpoint:
        endpoint = "https://" + endpoint
    return S3Settings(
        endpoint=endpoint,
        region=setting("AWS_REGION", "AWS_DEFAULT_REGION"),
        key=key,
        secret=secret,
        token=token,
        anon=setting("AWS_NO_SIGN_REQUEST") in ("1", "true", "yes")
        or (isolated and not (key and secret)),
        profile=None if isolated else setting("AWS_PROFILE"),
        ca_bundle=setting("AWS_CA_BUNDLE"),
    )


def credential_chain(profile: str | None) -> tuple[Refresh, str | None] | None:
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


CHECKSUM_NAMES = (*CRCS, *STREAMS, "sha256")
"""S3 additional checksums read from ``x-amz-checksum-<name>``, cheapest first."""
COMPOSITE_NAMES = ("crc32c", "crc32")
"""The CRCs S3 publishes as COMPOSITE for multipart uploads (CRC64NVME is always
full-object; a composite SHA1/SHA256 cannot be checked without reading each upload part
in order, so those objects are checked by size, their sha256 recorded)."""


def composite_layout_needed(info: dict[str, Any]) -> bool:
    """Whether ``info`` (a HEAD's) carries a composite CRC we can check once we know the
    upload parts' layout (:func:`parse_object_parts`)."""
    if str(info.get("checksum_type") or "").upper() != "COMPOSITE":
        return False
    return any(
        composite_from_base64(n, str(info.get(f"checksum_{n}") or "")) for n in COMPOSITE_NAMES
    )


def parse_object_parts(body: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """The upload parts a ``GetObjectAttributes`` answer (``ObjectParts``) lists, each
    ``{"number", "size", "checksum_<alg>"}``, and the marker of the next page (None: last)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    listing = root.find(f"{ns}ObjectParts")
    if listing is None:
        return [], None
    parts = []
    for item in listing.iter(f"{ns}Part"):
        part: dict[str, Any] = {
            "number": int(item.findtext(f"{ns}PartNumber") or 0),
            "size": int(item.findtext(f"{ns}Size") or -1),
        }
        for name in COMPOSITE_NAMES:
            part[f"checksum_{name}"] = item.findtext(f"{ns}Checksum{name.upper()}")
        parts.append(part)
    truncated = (listing.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    return parts, listing.findtext(f"{ns}NextPartNumberMarker") if truncated else None


def s3_remote(path: str, info: dict[str, Any]) -> RemoteFile:
    """A listed S3 object, with the strongest cheap check it publishes: a whole-object CRC
    (``checksum_<alg>`` from a HEAD with checksum mode), a COMPOSITE CRC (``<b64>-N``, when
    ``info["parts"]`` gives the upload parts), a whole-object XXHASH or SHA1, else its
    sha256, else the MD5 a single-part ETag (32 hex digits) is."""
    etag = str(info.get("ETag") or "").strip('"') or None
    md5 = etag if etag and re.fullmatch(r"[0-9a-f]{32}", etag) else None
    crc = sha256 = digest = composite = None
    kind = str(info.get("checksum_type") or "FULL_OBJECT").upper()
    if kind == "FULL_OBJECT":
        for name in CHECKSUM_NAMES:
            value = info.get(f"checksum_{name}")
            if not value:
                continue
            if name in CRCS:
                crc = crc_from_base64(name, value)
            elif name in STREAMS:
                digest = stream_from_base64(name, value)
            elif crc is None and digest is None:
                raw = _b64(value)
                sha256 = raw.hex() if len(raw) == 32 else None
            if crc or digest:
                break
    elif kind == "COMPOSITE" and info.get("parts"):
        composite = _composite(info)
    return RemoteFile(
        path,
        info["name"],
        int(info["size"]),
        etag=etag,
        md5=md5,
        sha256=sha256,
        crc=crc,
        composite=composite,
        digest=digest,
    )


def _composite(info: dict[str, Any]) -> CompositeCrc | None:
    """The composite CRC of ``info`` with its upload parts; None when the parts listed do
    not add up to it (their count, their numbers in order)."""
    parts = info["parts"]
    if [p.get("number") for p in parts] != list(range(1, len(parts) + 1)):
        return None
    for name in COMPOSITE_NAMES:
        found = composite_from_base64(name, str(info.get(f"checksum_{name}") or ""))
        if found is None or found[1] != len(parts):
            continue
        crcs = []
        for p in parts:
            each = crc_from_base64(name, p.get(f"checksum_{name}") or "")
            crcs.append(each[1] if each else None)
        sizes = tuple(int(p["size"]) for p in parts)
        if min(sizes) < 1:
            return None
        return CompositeCrc(name, found[0], sizes, tuple(crcs))
    return None


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b""


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
