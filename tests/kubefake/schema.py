"""CRD validation as the apiserver does it: prune, OpenAPI schema, then CEL rules.

Used by the manifest tests (to exercise every rule against good and bad objects) and by
the fake API server (so what tests send is checked like a cluster would check it).
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

__all__ = ["CRD_DIR", "CustomResource", "load_crds", "prune", "validate_object"]

CRD_DIR = Path(__file__).resolve().parents[2] / "daemonset" / "crds"


class CustomResource:
    """What the fake needs to know of one CRD (its single version)."""

    def __init__(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        (version,) = spec["versions"]
        self.crd = crd
        self.group: str = spec["group"]
        self.version: str = version["name"]
        self.kind: str = spec["names"]["kind"]
        self.plural: str = spec["names"]["plural"]
        self.namespaced = spec["scope"] == "Namespaced"
        self.schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
        self.subresources: dict[str, Any] = version.get("subresources", {})


@cache
def load_crds(folder: Path = CRD_DIR) -> dict[str, CustomResource]:
    """Every CRD of ``folder``, by plural."""
    crds = [CustomResource(yaml.safe_load(p.read_text())) for p in sorted(folder.glob("*.yaml"))]
    return {c.plural: c for c in crds}


def prune(schema: dict[str, Any], value: Any) -> Any:
    """Drop fields the schema does not know, as the apiserver does (metadata untouched)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            return {
                k: (v if k == "metadata" else prune(props[k], v))
                for k, v in value.items()
                if k in props
            }
        if isinstance(extra, dict):
            return {k: prune(extra, v) for k, v in value.items()}
        return value if schema.get("type") != "object" else {}
    if isinstance(value, list) and "items" in schema:
        return [prune(schema["items"], v) for v in value]
    return value


def validate_object(
    schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None
) -> list[str]:
    """Problems with ``obj`` (already pruned) as ``field: message`` lines; empty when valid."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    top = copy.deepcopy(schema)
    top.get("properties", {}).pop("metadata", None)
    problems = [
        f"{_path(e.absolute_path) or '<root>'}: {e.message}"
        for e in jsonschema.Draft7Validator(top).iter_errors(body)
    ]
    if problems:
        return problems
    _cel(schema, body, None if old is None else old, "", problems)
    return problems


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _cel(schema: dict[str, Any], value: Any, old: Any, where: str, problems: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        expression = rule["rule"]
        activation = {"self": value}
        if "oldSelf" in expression:
            if old is None:  # transition rules run on updates only
                continue
            activation["oldSelf"] = old
        if not _evaluate(expression, activation):
            message = rule.get("message") or f"failed rule: {expression}"
            problems.append(f"{where or '<root>'}: Invalid value: {message}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is not None and key != "metadata":
                prior = old.get(key) if isinstance(old, dict) else None
                _cel(sub, item, prior, f"{where}.{key}" if where else key, problems)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _cel(schema["items"], item, None, f"{where}[{i}]", problems)


@cache
def _program(expression: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _evaluate(expression: str, activation: dict[str, Any]) -> bool:
    cel_activation = {k: celpy.json_to_cel(v) for k, v in activation.items()}
    result = _program(expression).evaluate(cel_activation)
    if isinstance(result, Exception):  # cel-python returns evaluation errors as values
        return False
    return bool(result)
