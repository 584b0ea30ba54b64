"""What kubectl needs besides CRUD: discovery documents and server-side Table printing."""

from __future__ import annotations

import datetime
import re
from typing import Any

__all__ = ["api_group_list", "api_versions", "resource_list", "table", "wants_table"]

JSON = dict[str, Any]
_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
_STEP = re.compile(r'\.([A-Za-z0-9_-]+)|\[\?\(@\.([A-Za-z0-9_]+)==["\']([^"\']*)["\']\)\]')


def api_versions(address: str) -> JSON:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    }


def api_group_list(types: list[Any]) -> JSON:
    groups: dict[str, set[str]] = {}
    for t in types:
        if t.group:
            groups.setdefault(t.group, set()).add(t.version)
    out = []
    for name, versions in sorted(groups.items()):
        listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in sorted(versions)]
        out.append({"name": name, "versions": listed, "preferredVersion": listed[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}


def resource_list(group_version: str, types: list[Any]) -> JSON:
    resources = []
    for t in types:
        crd = t.crd or {}
        names = (crd.get("spec") or {}).get("names") or {}
        resources.append({
            "name": t.plural, "singularName": names.get("singular", t.kind.lower()),
            "namespaced": t.namespaced, "kind": t.kind, "verbs": _VERBS,
            "shortNames": names.get("shortNames", []),
            "categories": names.get("categories", []),
        })  # fmt: skip
        for sub, kind in (("status", t.kind), ("scale", "Scale")):
            if (sub == "status" and t.status) or (sub == "scale" and t.scale):
                group = "autoscaling" if sub == "scale" else None
                resources.append({
                    "name": f"{t.plural}/{sub}", "singularName": "", "namespaced": t.namespaced,
                    "kind": kind, "verbs": ["get", "patch", "update"],
                    **({"group": group, "version": "v1"} if group else {}),
                })  # fmt: skip
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}  # fmt: skip


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def table(columns: list[JSON], objects: list[JSON], resource_version: str) -> JSON:
    """A meta.k8s.io/v1 Table, as the apiserver prints a CRD's additionalPrinterColumns."""
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                    "description": "Name must be unique within a namespace."}]  # fmt: skip
    definitions += [
        {"name": c["name"], "type": c["type"], "format": c.get("format", ""),
         "description": c.get("description", ""), "priority": c.get("priority", 0)}
        for c in columns
    ]  # fmt: skip
    rows = []
    for obj in objects:
        cells: list[Any] = [obj["metadata"]["name"]]
        for c in columns:
            value = _jsonpath(obj, c["jsonPath"])
            if c["type"] == "date" and isinstance(value, str):
                value = _age(value)
            cells.append(value)
        metadata = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
        rows.append({"cells": cells, "object": {
            "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata}})  # fmt: skip
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": definitions, "rows": rows}  # fmt: skip


def _jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath printer columns use: .field steps and [?(@.key=="value")]."""
    current = [obj]
    for field, key, value in _STEP.findall(path):
        found = []
        for item in current:
            if field and isinstance(item, dict) and field in item:
                found.append(item[field])
            elif key and isinstance(item, list):
                found += [e for e in item if isinstance(e, dict) and str(e.get(key)) == value]
        current = found
    return current[0] if current else None


def _age(timestamp: str) -> str:
    then = datetime.datetime.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.UTC
    )
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(0, seconds)}s"
