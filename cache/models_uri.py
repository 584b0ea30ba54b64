"""``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``: MLflow Model Registry URIs.

Parsed in one place for :mod:`nodecache.cache.uri` (validation, normal form) and the
MLflow source. The forms and rules follow MLflow's own ``_parse_model_uri``: the name is
one path segment taken literally (no percent-decoding), a version is a number, an alias
is letters, digits, ``_`` and ``-``. Stages and ``latest`` are refused: they move, and
an alias says the same thing explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodecache.cache.errors import InvalidSourceError

__all__ = ["ModelsUri", "parse_models_uri"]

_FORMS = "write models:/NAME/VERSION or models:/NAME@ALIAS"
_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_MAX_NAME = 256


@dataclass(frozen=True)
class ModelsUri:
    """A registered model and either a version or an alias."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}" + (
            f"/{self.version}" if self.version is not None else f"@{self.alias}"
        )


def parse_models_uri(text: str, shown: str) -> ModelsUri:
    """Parse ``text`` (already free of control characters); ``shown`` is its redacted form
    for messages. Raises :class:`InvalidSourceError`."""
    scheme, _, rest = text.partition(":")
    if scheme.lower() != "models":
        raise InvalidSourceError(f"not a models:/ URI: {shown!r}")
    if rest.startswith("//"):
        raise InvalidSourceError(
            f"{shown!r} names a tracking server or profile in the URI; {_FORMS} "
            "(one slash) and set MLFLOW_TRACKING_URI"
        )
    if not rest.startswith("/") or "?" in rest or "#" in rest:
        raise InvalidSourceError(f"malformed MLflow model URI {shown!r}; {_FORMS}")
    parts = rest[1:].split("/")
    if len(parts) == 2:
        name, version = parts
        if not version.isdecimal() or not version.isascii() or int(version) < 1:
            raise InvalidSourceError(
                f"{shown!r}: version {version!r} is not a version number; {_FORMS} "
                "(stages and 'latest' move: give the registry an alias instead)"
            )
        return ModelsUri(_name(name, shown), version=str(int(version)))
    if len(parts) == 1 and "@" in parts[0]:
        name, _, alias = parts[0].rpartition("@")
        if not _ALIAS.match(alias):
            raise InvalidSourceError(
                f"{shown!r}: invalid alias {alias!r}; use letters, digits, '_' and '-'"
            )
        return ModelsUri(_name(name, shown), alias=alias)
    raise InvalidSourceError(f"{shown!r} names no version or alias; {_FORMS}")


def _name(name: str, shown: str) -> str:
    if not name.strip() or len(name) > _MAX_NAME or name in (".", ".."):
        raise InvalidSourceError(f"{shown!r}: invalid registered model name {name!r}")
    return name
