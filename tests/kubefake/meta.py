"""ObjectMeta label rules as the apiserver checks them on every write, of every kind.

apimachinery's IsQualifiedName (keys) and IsValidLabelValue (values), with its messages, so
an agent that writes a label a cluster would refuse is refused here too (422).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["label_problems"]

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CHARS = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character"
)


def _key_problems(key: str) -> list[str]:
    parts = key.split("/")
    if len(parts) > 2:
        return [f"a qualified name {_CHARS}, with an optional DNS subdomain prefix and '/'"]
    prefix, name = parts if len(parts) == 2 else ("", parts[0])
    out = []
    if len(parts) == 2 and not prefix:
        out.append("prefix part must be non-empty")
    elif prefix and len(prefix) > 253:
        out.append("prefix part must be no more than 253 characters")
    elif prefix and not _SUBDOMAIN.match(prefix):
        out.append(
            "prefix part a lowercase RFC 1123 subdomain must consist of lower case "
            "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
            "character"
        )
    if not name:
        out.append("name part must be non-empty")
    elif len(name) > 63:
        out.append("name part must be no more than 63 characters")
    elif not _NAME.match(name):
        out.append(f"name part {_CHARS}")
    return out


def label_problems(meta: dict[str, Any]) -> list[str]:
    """``field: message`` lines for ``meta.labels``; empty when a cluster would accept them."""
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        return ["metadata.labels: Invalid value: must be a map of strings"]
    out = []
    for key, value in labels.items():
        out += [f'metadata.labels: Invalid value: "{key}": {m}' for m in _key_problems(key)]
        if not isinstance(value, str):
            out.append(f'metadata.labels: Invalid value: "{key}": the value must be a string')
        elif len(value) > 63:
            out.append(f'metadata.labels: Invalid value: "{value}": must be no more than 63 '
                       "characters")  # fmt: skip
        elif not _VALUE.match(value):
            out.append(
                f'metadata.labels: Invalid value: "{value}": a valid label must be an empty '
                f"string or {_CHARS.removeprefix('must ')}"
            )
    return out
