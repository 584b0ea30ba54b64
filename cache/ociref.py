"""``oci://`` references: ``oci://HOST[:PORT]/REPO[:TAG][@sha256:DIGEST]``, parsed once.

The grammar is the distribution spec's (``distribution/reference``): lowercase path
components, a tag of at most 128 word characters, dots and dashes, a sha256 digest. As
Docker does, a first component without a dot or a port that is not ``localhost`` names a
Docker Hub repository (``oci://kserve/sklearnserver:v1``, ``oci://ubuntu:24.04``). Both
:mod:`nodecache.cache.uri` (validation) and the OCI source use it, so what is accepted is
what is fetched.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from nodecache.cache.errors import InvalidSourceError

__all__ = ["DOCKER_HUB", "Mirror", "OciRef", "is_loopback", "parse_mirror", "parse_oci_uri"]

DOCKER_HUB = "registry-1.docker.io"
"""Where Docker Hub's API lives (``docker.io`` is only its name)."""
_HUB_NAMES = {"docker.io", "index.docker.io", DOCKER_HUB}
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]{1,5})?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_MAX_NAME = 255


@dataclass(frozen=True)
class OciRef:
    """One manifest in one registry: a tag, a digest, or both (the digest wins)."""

    registry: str
    """``host[:port]`` of the registry API (Docker Hub's is :data:`DOCKER_HUB`)."""
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest where given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def host(self) -> str:
        return self.registry.rsplit(":", 1)[0] if self.registry.count(":") == 1 else self.registry

    def uri(self) -> str:
        """The normalised ``oci://`` URI."""
        out = f"oci://{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` (no port) is this machine: plain HTTP is allowed there, as Docker
    allows it for ``127.0.0.0/8``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Mirror:
    """``--registry-mirror HOST=MIRROR``: a registry (pull-through cache, Spegel,
    Dragonfly) to try before ``registry`` for content addressed by digest."""

    registry: str
    """``host[:port]`` of the registry mirrored (Docker Hub's is :data:`DOCKER_HUB`)."""
    url: str
    """``scheme://host[:port]`` of the mirror: https unless it is on loopback or written
    with ``http://``."""

    @property
    def host(self) -> str:
        """``host[:port]`` of the mirror, as a docker config names it."""
        return self.url.partition("://")[2]


def parse_mirror(text: str) -> Mirror:
    """``HOST=MIRROR`` (``docker.io=127.0.0.1:5001``, ``ghcr.io=https://cache.local``), or
    :class:`InvalidSourceError` saying why not."""
    host, eq, mirror = text.strip().partition("=")
    example = "e.g. docker.io=mirror.local:5000"
    if not eq or not host or not mirror:
        raise InvalidSourceError(f"{text!r} is not HOST=MIRROR, {example}")
    registry = host.lower()
    registry = DOCKER_HUB if registry in _HUB_NAMES else registry
    scheme, sep, rest = mirror.partition("://")
    if not sep:
        scheme, rest = "", mirror
    name = rest.rstrip("/").lower()
    for what, value in (("registry", registry), ("mirror", name)):
        port = value.rpartition(":")[2] if ":" in value else "1"
        if not _HOST.fullmatch(value) or not 0 < int(port) < 65536:
            raise InvalidSourceError(
                f"invalid {what} {value!r} in {text!r}: a host[:port] (no path), {example}"
            )
    if scheme not in ("", "http", "https"):
        raise InvalidSourceError(f"mirror {mirror!r} in {text!r}: only http:// or https://")
    if not scheme:
        bare = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        scheme = "http" if is_loopback(bare) else "https"
    return Mirror(registry, f"{scheme}://{name}")


def parse_oci_uri(uri: str) -> OciRef:
    """The reference an ``oci://`` URI names, or :class:`InvalidSourceError` saying why not."""
    if not uri.lower().startswith("oci://"):
        raise InvalidSourceError(f"not an oci:// URI: {uri!r}")
    rest = uri[len("oci://") :]
    if "?" in rest or "#" in rest:
        raise InvalidSourceError(f"unexpected '?' or '#' in {uri!r}; write oci://HOST/REPO:TAG")
    name, _, digest = rest.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise InvalidSourceError(
            f"invalid digest {digest!r} in {uri!r}; expected sha256: and 64 lowercase hex digits"
        )
    tag = None
    head, sep, last = name.rpartition(":")
    if sep and "/" not in last:
        name, tag = head, last
        if not _TAG.fullmatch(tag):
            raise InvalidSourceError(
                f"invalid tag {tag!r} in {uri!r}; use up to 128 letters, digits, '_', '.', '-'"
            )
    first, slash, path = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry = first.lower()
        if not _HOST.fullmatch(registry):
            raise InvalidSourceError(f"invalid registry host {first!r} in {uri!r}")
        port = registry.rpartition(":")[2] if ":" in registry else None
        if port is not None and not 0 < int(port) < 65536:
            raise InvalidSourceError(f"invalid registry port in {uri!r}")
        if registry in _HUB_NAMES:
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, name
    if registry == DOCKER_HUB and path and "/" not in path:
        path = f"library/{path}"
    if not path:
        raise InvalidSourceError(f"missing repository in {uri!r}; write oci://HOST/REPO:TAG")
    if len(path) > _MAX_NAME or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise InvalidSourceError(
            f"invalid repository {path!r} in {uri!r}; use lowercase letters, digits and "
            "'.', '_', '-' between them, components separated by '/'"
        )
    if tag is None and not digest:
        raise InvalidSourceError(
            f"{uri!r} names neither a tag nor a digest; add ':TAG' or '@sha256:DIGEST' "
            "(an implicit 'latest' would change under a running model)"
        )
    return OciRef(registry, path, tag, digest or None)
