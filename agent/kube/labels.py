"""Node labels that say which models a node holds, so pods can use node affinity.

A cluster cache ``NAME`` is ``cache.nodecache.io/NAME``; a namespaced cache ``NS/NAME`` is
``NS.cache.nodecache.io/NAME``: the namespace goes in the prefix, so the 63 characters of a
label key's name part stay for the cache's name. The value is ``disk`` (verified on local
disk) or ``warm`` (loaded as well); a model that is not (yet) on disk has no label. Names
that cannot be a label key are skipped and the status says why.

Pure functions: the status writer applies them (``label_patch`` touches only keys under our
prefixes), and the ValidatingAdmissionPolicy in daemonset/rbac/agent-node-labels.yaml holds
the agent to the same prefixes (``OWN_KEY``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "DOMAIN",
    "OWN_KEY",
    "desired_labels",
    "is_ours",
    "label_key",
    "label_patch",
    "with_node_labels",
]

JSON = dict[str, Any]
DOMAIN = "cache.nodecache.io"
OWN_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)?cache\.nodecache\.io/"
"""Keys this agent owns: ``cache.nodecache.io/…`` and ``<namespace>.cache.nodecache.io/…``."""
VALUES = {"Downloaded": "disk", "Loading": "disk", "Warm": "warm"}
"""Model state -> label value; other states are not held (yet): no label."""

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_OWN = re.compile(OWN_KEY)


def label_key(model_name: str) -> tuple[str | None, str | None]:
    """(key, None) for a LocalModelNode ``modelName`` (``NAME`` or ``NS/NAME``), or
    (None, why) when no label key can hold it."""
    namespace, _, name = model_name.rpartition("/")
    if namespace and (len(namespace) > 63 or not _DNS_LABEL.match(namespace)):
        return None, f"namespace {namespace!r} is not a DNS label: no label key prefix can hold it"
    if len(name) > 63:
        return None, (
            f"name is {len(name)} characters, a label key's name part holds at most 63: "
            "no node label; node affinity cannot select this model"
        )
    if not _NAME.match(name):
        return None, "name is not a valid label key name: no node label"
    return (f"{namespace}.{DOMAIN}/{name}" if namespace else f"{DOMAIN}/{name}"), None


def is_ours(key: str) -> bool:
    """A label this agent manages (and the admission policy lets it change)."""
    return bool(_OWN.match(key))


def with_node_labels(status: JSON) -> JSON:
    """``status`` with the ``nodeLabel`` key of each model the node holds (on disk or
    warm), or ``nodeLabelSkipped`` and why none can name it."""
    for model_name, entry in (status.get("modelStatus") or {}).items():
        if entry.get("state") not in VALUES:
            continue
        key, why = label_key(model_name)
        if key is not None:
            entry["nodeLabel"] = key
        else:
            entry["nodeLabelSkipped"] = why
    return status


def desired_labels(status: JSON) -> dict[str, str]:
    """Our labels for a status from ``with_node_labels``: held models only."""
    return {
        entry["nodeLabel"]: VALUES[entry.get("state", "")]
        for entry in (status.get("modelStatus") or {}).values()
        if "nodeLabel" in entry and entry.get("state") in VALUES
    }


def label_patch(current: dict[str, str], desired: dict[str, str]) -> JSON | None:
    """A merge patch taking our labels on the node from ``current`` to ``desired``; None
    when they already agree. Labels outside our prefixes are never named in it."""
    mine = {k: v for k, v in current.items() if is_ours(k)}
    wanted = {k: v for k, v in desired.items() if is_ours(k)}
    changes: dict[str, str | None] = {k: v for k, v in wanted.items() if mine.get(k) != v}
    changes.update({k: None for k in mine if k not in wanted})  # null removes (RFC 7386)
    return {"metadata": {"labels": changes}} if changes else None
