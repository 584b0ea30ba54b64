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

from nodecache.cache.checksums import crc_from_base64
from nodecache.cache.errors import FetchError
from nodecache.cache.sources.base import RemoteFile, lookup_setting

__all__ = [
    "CHECKSUM_NAMES",
    "Refresh",
    "S3Settings",
    "credential_chain",
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
    ``AWS_PROFILE``) is read here, unless keys were given as values."""

    def setting(*names: str) -> str | None:
        return lookup_setting(credentials, *names)

    key = setting("AWS_ACCESS_KEY_ID")
    secret = setting("AWS_SECRET_ACCESS_KEY")
    token = setting("AWS_SESSION_TOKEN")
    shared = credentials.get("AWS_SHARED_CREDENTIALS_FILE")
    if shared and not credentials.get("AWS_ACCESS_KEY_ID"):
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
        anon=setting("AWS_NO_SIGN_REQUEST") in ("1", "true", "yes"),
        profile=setting("AWS_PROFILE"),
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


CHECKSUM_NAMES = ("crc64nvme", "crc32c", "crc32", "sha256")
"""S3 additional checksums read from ``x-amz-checksum-<name>``, cheapest first."""


def s3_remote(path: str, info: dict[str, Any]) -> RemoteFile:
    """A listed S3 object, with the strongest cheap check it publishes: a whole-object CRC
    (``checksum_<alg>`` from a HEAD with checksum mode), else its sha256, else the MD5 a
    single-part ETag (32 hex digits) is. A COMPOSITE checksum (a CRC of the parts' CRCs,
    ``...-N``) is not one of the bytes as a whole: without part boundaries it is skipped."""
    etag = str(info.get("ETag") or "").strip('"') or None
    md5 = etag if etag and re.fullmatch(r"[0-9a-f]{32}", etag) else None
    crc = sha256 = None
    if str(info.get("checksum_type") or "FULL_OBJECT").upper() == "FULL_OBJECT":
        for name in CHECKSUM_NAMES[:3]:
            value = info.get(f"checksum_{name}")
            crc = crc_from_base64(name, value) if value else None
            if crc is not None:
                break
        published = info.get("checksum_sha256")
        if published and crc is None:
            try:
                raw = base64.b64decode(published, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            sha256 = raw.hex() if len(raw) == 32 else None
    return RemoteFile(
        path, info["name"], int(info["size"]), etag=etag, md5=md5, sha256=sha256, crc=crc
    )


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
