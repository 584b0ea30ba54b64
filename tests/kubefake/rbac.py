"""Would the DaemonSet's RBAC allow what a component did? Checked against recorded calls.

The fake records each request with its bearer token; the harness gives the agent the token
"agent" and the reconciler "reconciler". Every call is mapped to an authorization request
(verb, group, resource[/subresource], namespace, name) and matched against the rules of
daemonset/rbac, as the apiserver's RBAC authorizer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from .server import ApiError, FakeApiServer, ResourceType

__all__ = ["authorize", "denied_calls"]

RBAC = Path(__file__).resolve().parents[2] / "daemonset" / "rbac"
ACCOUNTS = {"agent": "nodecache-agent", "reconciler": "nodecache-reconciler"}
NAMESPACE = "nodecache-system"


def _rules(account: str) -> list[tuple[dict[str, Any], str | None]]:
    """(rule, namespace it applies in, None for cluster-wide) bound to ``account``."""
    docs = [d for p in sorted(RBAC.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"].endswith("Role")}
    out = []
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        if not any(s["name"] == account for s in binding["subjects"]):
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        out += [(rule, scope) for rule in role["rules"]]
    return out


def _allows(rule: dict[str, Any], verb: str, group: str, resource: str, name: str | None) -> bool:
    names = rule.get("resourceNames")
    return (
        group in rule["apiGroups"]
        and resource in rule["resources"]
        and verb in rule["verbs"]
        and (not names or name in names)
    )


def _cluster_roles() -> dict[str, dict[str, Any]]:
    docs = [d for p in sorted(RBAC.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}


def _stored_bindings(fake: FakeApiServer, account: str) -> list[tuple[dict[str, Any], str]]:
    """Rules granted to ``account`` by RoleBindings created in the fake (to a ClusterRole of
    daemonset/rbac, as a namespace admin would bind one), with their namespace."""
    roles = _cluster_roles()
    out = []
    for (group, plural, namespace, _), obj in list(fake.state.objects.items()):
        if (group, plural) != ("rbac.authorization.k8s.io", "rolebindings"):
            continue
        ref = obj.get("roleRef", {})
        if ref.get("kind") != "ClusterRole" or ref.get("name") not in roles:
            continue
        if any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == account
            and s.get("namespace") == NAMESPACE
            for s in obj.get("subjects") or []
        ):
            out += [(rule, namespace) for rule in roles[ref["name"]]["rules"]]
    return out


def authorize(
    fake: FakeApiServer,
    token: str,
    method: str,
    rtype: ResourceType,
    namespace: str | None,
    name: str | None,
) -> None:
    """403 unless the token's ServiceAccount may do this (other tokens are admins)."""
    account = ACCOUNTS.get(token)
    if account is None:
        return
    verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update"}.get(
        method, method.lower()
    )
    rules = _rules(account) + _stored_bindings(fake, account)
    if not any(
        _allows(rule, verb, rtype.group, rtype.plural, name)
        and (scope is None or scope == namespace)
        for rule, scope in rules
    ):
        raise ApiError(
            403,
            "Forbidden",
            f'{rtype.plural} "{name}" is forbidden: User "system:serviceaccount:{NAMESPACE}:'
            f'{account}" cannot {verb} resource "{rtype.plural}" in the namespace "{namespace}"',
        )


def denied_calls(fake: FakeApiServer) -> list[str]:
    """Calls the agent or reconciler made that their ServiceAccount could not make."""
    rules = {
        token: _rules(account) + _stored_bindings(fake, account)
        for token, account in ACCOUNTS.items()
    }
    denied = []
    for token, method, path_qs in fake.calls:
        if token not in rules:
            continue
        url = urlsplit(path_qs)
        if not url.path.startswith(("/api/", "/apis/")) or url.path.count("/") < 3:
            continue  # discovery
        rtype, namespace, name, sub = fake.route(url.path)
        watching = parse_qs(url.query).get("watch") == ["true"]
        verb = {
            "GET": "get" if name else ("watch" if watching else "list"),
            "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete",
        }[method]  # fmt: skip
        resource = f"{rtype.plural}/{sub}" if sub else rtype.plural
        ok = any(
            _allows(rule, verb, rtype.group, resource, name)
            and (scope is None or scope == namespace)
            for rule, scope in rules[token]
        )
        if not ok:
            denied.append(f"{token}: {verb} {resource} {namespace or ''}/{name or ''}")
    return sorted(set(denied))
