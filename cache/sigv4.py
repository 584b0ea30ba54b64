"""AWS Signature Version 4 for S3 requests signed in the ``Authorization`` header.

A few HMACs per request on top of the standard library, so the S3 source can list, HEAD and
read objects over its own keep-alive connections without importing botocore (~0.5 s) or
hopping to an event-loop thread. Only what S3 GET/HEAD requests need: the payload is always
empty, and the signed headers are ``host``, ``x-amz-content-sha256``, ``x-amz-date`` and
``x-amz-security-token`` (when there is a session token).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

__all__ = ["EMPTY_SHA256", "SigV4", "canonical_query", "uri_encode"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def uri_encode(text: str, *, slash: bool = True) -> str:
    """Percent-encode as SigV4 wants: everything but ``A-Za-z0-9-_.~`` (and ``/`` if
    ``slash``)."""
    return quote(text, safe="/~" if slash else "~")


def canonical_query(params: dict[str, str]) -> str:
    """``k=v&...`` sorted by key, both encoded; the same string is sent and signed."""
    return "&".join(
        f"{uri_encode(k, slash=False)}={uri_encode(v, slash=False)}"
        for k, v in sorted(params.items())
    )


Credentials = tuple[str, str, "str | None"]
"""(access key, secret key, session token)."""


class SigV4:
    """Signs requests for one set of credentials and one region (changeable).

    ``refresh``, when given, is asked for the current credentials before each signature:
    temporary ones (web identity, instance roles, ``credential_process``) renew themselves
    through it, e.g. botocore's ``RefreshableCredentials.get_frozen_credentials``.
    """

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        token: str | None,
        region: str,
        service: str = "s3",
        *,
        refresh: Callable[[], Credentials] | None = None,
    ) -> None:
        self.access_key = access_key
        self._secret = secret_key
        self.token = token
        self.region = region
        self.service = service
        self._refresh = refresh
        self._keys: dict[tuple[str, str, str], bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the secret
        return f"SigV4(access_key={self.access_key[:4]}..., region={self.region!r})"

    def _signing_key(self, secret: str, day: str, region: str) -> bytes:
        with self._lock:
            key = self._keys.get((secret, day, region))
            if key is None:
                k = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
                for part in (region, self.service, "aws4_request"):
                    k = hmac.digest(k, part.encode(), "sha256")
                self._keys = {(secret, day, region): k}
                key = k
            return key

    def headers(
        self,
        method: str,
        url: str,
        *,
        now: float | None = None,
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Headers to add to a request for ``url`` (already encoded, query canonical),
        including ``extra`` (``x-amz-*`` headers, which S3 requires to be signed)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port and parts.port != (443 if parts.scheme == "https" else 80):
            host = f"{host}:{parts.port}"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        day = stamp[:8]
        region = self.region
        if self._refresh is not None:
            access_key, secret, token = self._refresh()
        else:
            access_key, secret, token = self.access_key, self._secret, self.token
        signed = {"host": host, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": stamp}
        if token:
            signed["x-amz-security-token"] = token
        for name, value in (extra or {}).items():
            signed[name.lower()] = value.strip()
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                parts.path or "/",
                _sorted_query(parts.query),
                "".join(f"{n}:{signed[n]}\n" for n in names),
                ";".join(names),
                EMPTY_SHA256,
            ]
        )
        scope = f"{day}/{region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(
            self._signing_key(secret, day, region), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        out = {
            "Host": host,
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": stamp,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                f"SignedHeaders={';'.join(names)}, Signature={signature}"
            ),
        }
        if token:
            out["x-amz-security-token"] = token
        out.update(extra or {})
        return out


def _sorted_query(query: str) -> str:
    """The canonical form of an already-encoded query string: pairs sorted, ``k=`` kept."""
    if not query:
        return ""
    pairs = []
    for item in query.split("&"):
        key, _, value = item.partition("=")
        pairs.append((key, value))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))
