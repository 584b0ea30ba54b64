"""Credentials a cache names in ``spec.storage``, read from Kubernetes Secrets at fetch time.

Which Secret a cache may name is a security decision, not a convenience:

- A ``LocalModelCache`` (cluster-scoped, written by cluster admins) names a Secret in the
  agent's own namespace, which the agent's Role lets it read.
- A ``LocalModelNamespaceCache`` names a Secret in *its own* namespace, never the agent's:
  otherwise a tenant could make the node fetch with the platform's credentials (a confused
  deputy). The agent can read it only where that namespace's admin has bound the
  ``nodecache-agent-secrets`` ClusterRole to the agent in that namespace; no binding, no read,
  and the model's status says how to grant it.

``storage.key`` follows KServe's storage spec: a key of the ``storage-config`` Secret whose
value is a JSON object (``{"type": "s3", "access_key_id": ...}``), mapped to the names our
sources read. ``storage.parameters`` override both. Secrets are read with one GET per fetch
and never cached, listed or logged.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from nodecache.agent.declarations import ModelDeclaration
from nodecache.agent.kube.api import SECRETS, Kube
from nodecache.agent.kube.errors import ApiError
from nodecache.cache.errors import FetchError

__all__ = ["STORAGE_CONFIG", "CredentialsError", "SecretCredentials", "storage_config_names"]

STORAGE_CONFIG = "storage-config"
"""KServe's Secret of named storage configurations, read for ``storage.key``."""

# KServe storage-config fields -> the names our sources read (cache/sources/*).
_KSERVE_NAMES = {
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region": "AWS_DEFAULT_REGION",
    "anonymous": "AWS_NO_SIGN_REQUEST",
    "hf_token": "HF_TOKEN",
    "account_name": "AZURE_STORAGE_ACCOUNT_NAME",
    "account_key": "AZURE_STORAGE_ACCOUNT_KEY",
    "connection_string": "AZURE_STORAGE_CONNECTION_STRING",
    "sas_token": "AZURE_STORAGE_SAS_TOKEN",
    "client_id": "AZURE_CLIENT_ID",
    "client_secret": "AZURE_CLIENT_SECRET",
    "tenant_id": "AZURE_TENANT_ID",
}


class CredentialsError(FetchError):
    """A Secret a cache names cannot be read; the message says what to do, never a value.
    A fetch error that waits for someone to act (create the Secret, bind the role), so the
    model shows it as its error and retries with backoff like any failed fetch."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


def storage_config_names(entry: Mapping[str, Any]) -> dict[str, str]:
    """One KServe storage-config entry as the names our sources read; unknown fields
    (``type``, ``bucket``) are dropped, since the URI already says them."""
    out: dict[str, str] = {}
    for field, value in entry.items():
        name = _KSERVE_NAMES.get(str(field))
        if name is not None and isinstance(value, str | int | bool):
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


class SecretCredentials:
    """Resolves a declaration's ``spec.storage`` to the credentials its source reads."""

    def __init__(self, kube: Kube, agent_namespace: str) -> None:
        self.kube = kube
        self.agent_namespace = agent_namespace

    async def __call__(self, decl: ModelDeclaration) -> dict[str, str] | None:
        storage = decl.storage or {}
        ref = storage.get("secretRef")
        key = storage.get("key")
        if not ref and not key:
            return decl.storage_parameters()
        namespace = decl.namespace or self.agent_namespace
        found: dict[str, str] = {}
        if isinstance(ref, Mapping) and ref.get("name"):
            found.update(await self._data(str(ref["name"]), namespace))
        if key:
            config = await self._data(STORAGE_CONFIG, namespace)
            raw = config.get(str(key))
            if raw is None:
                raise CredentialsError(
                    f"storage.key {key!r}: no such key in Secret {namespace}/{STORAGE_CONFIG}"
                )
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                raise CredentialsError(
                    f"storage.key {key!r}: the value in Secret {namespace}/{STORAGE_CONFIG} "
                    "is not a JSON object"
                )
            found.update(storage_config_names(entry))
        return {**found, **(decl.storage_parameters() or {})}

    async def _data(self, name: str, namespace: str) -> dict[str, str]:
        try:
            secret = await self.kube.get(SECRETS, name, namespace)
        except ApiError as exc:
            if exc.status == 404:
                raise CredentialsError(f"Secret {namespace}/{name} not found") from None
            if exc.status == 403:
                raise CredentialsError(
                    f"the node agent may not read Secret {namespace}/{name}: bind the "
                    f"ClusterRole nodecache-agent-secrets to ServiceAccount "
                    f"{self.agent_namespace}/nodecache-agent in namespace {namespace}"
                ) from None
            raise CredentialsError(f"Secret {namespace}/{name} not read: {exc}") from None
        out = {}
        for field, value in (secret.get("data") or {}).items():
            try:
                out[str(field)] = base64.b64decode(value, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise CredentialsError(
                    f"Secret {namespace}/{name}: key {field!r} is not base64 UTF-8 text"
                ) from None
        return out
