"""The blocking client behind async calls: config loading, CRUD on dicts, one watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config, watch

from nodecache.agent.kube.errors import translate

__all__ = [
    "LEASES",
    "LOCAL_MODEL_CACHES",
    "LOCAL_MODEL_NAMESPACE_CACHES",
    "LOCAL_MODEL_NODES",
    "LOCAL_MODEL_NODE_GROUPS",
    "NODES",
    "PODS",
    "SECRETS",
    "Backoff",
    "Kube",
    "Resource",
    "connect",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
JSON = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


GROUP, VERSION = "nodecache.io", "v1alpha1"
LOCAL_MODEL_CACHES = Resource(GROUP, VERSION, "localmodelcaches", "LocalModelCache")
LOCAL_MODEL_NAMESPACE_CACHES = Resource(
    GROUP, VERSION, "localmodelnamespacecaches", "LocalModelNamespaceCache", namespaced=True
)
LOCAL_MODEL_NODE_GROUPS = Resource(GROUP, VERSION, "localmodelnodegroups", "LocalModelNodeGroup")
LOCAL_MODEL_NODES = Resource(GROUP, VERSION, "localmodelnodes", "LocalModelNode")
NODES = Resource("", "v1", "nodes", "Node")
PODS = Resource("", "v1", "pods", "Pod", namespaced=True)
SECRETS = Resource("", "v1", "secrets", "Secret", namespaced=True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)


def connect(kubeconfig: Path | None = None) -> client.ApiClient:
    """The standard search: in-cluster, else ``kubeconfig``/$KUBECONFIG, else ~/.kube/config."""
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = 32  # a watch per informer, plus writes in parallel
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    # $KUBECONFIG read now: the client reads it once, when it is imported.
    found = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or "~/.kube/config"
    config.load_kube_config(config_file=found, client_configuration=configuration)
    return client.ApiClient(configuration)


class Backoff:
    """Exponential with jitter, for retrying while the API server is away."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return min(self.cap, self.base * 2 ** (self.attempt - 1)) * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


def run_in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Like ``asyncio.to_thread`` but on a daemon thread: a long watch never delays exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=body, daemon=True, name="kube-watch").start()
    return future


class Kube:
    """Async CRUD on plain dicts; every call runs the blocking client in a thread."""

    def __init__(self, api: client.ApiClient, *, request_timeout: float = 15.0) -> None:
        self.api = api
        self.timeout = request_timeout
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)

        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise translate(exc) from exc

        result = await asyncio.to_thread(run)
        return self.api.sanitize_for_serialization(result) if result is not None else None

    def _custom_args(self, res: Resource, namespace: str | None) -> tuple[Any, ...]:
        if res.namespaced and namespace is not None:
            return (res.group, res.version, namespace, res.plural)
        return (res.group, res.version, res.plural)

    def list_function(self, res: Resource, namespace: str | None = None) -> tuple[Any, tuple]:
        """The client function listing (and, with watch=True, watching) ``res``."""
        if res == NODES:
            return self.core.list_node, ()
        if res == PODS:
            return self.core.list_pod_for_all_namespaces, ()
        if res.group == GROUP:
            ns = res.namespaced and namespace is not None
            fn = (
                self.custom.list_namespaced_custom_object
                if ns
                else self.custom.list_cluster_custom_object
            )
            return fn, self._custom_args(res, namespace)
        raise ValueError(f"no list function for {res.plural}")

    async def list(self, res: Resource, namespace: str | None = None, **selectors: Any) -> JSON:
        fn, args = self.list_function(res, namespace)
        return await self._call(fn, *args, **selectors)

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> JSON:
        if res == LEASES:
            return await self._call(self.coordination.read_namespaced_lease, name, namespace)
        if res == NODES:
            return await self._call(self.core.read_node, name)
        if res == SECRETS:
            return await self._call(self.core.read_namespaced_secret, name, namespace)
        if res.namespaced:
            fn = self.custom.get_namespaced_custom_object
            return await self._call(fn, res.group, res.version, namespace, res.plural, name)
        fn = self.custom.get_cluster_custom_object
        return await self._call(fn, res.group, res.version, res.plural, name)

    async def create(self, res: Resource, body: JSON, namespace: str | None = None) -> JSON:
        body = {"apiVersion": res.api_version, "kind": res.kind, **body}
        if res == LEASES:
            return await self._call(self.coordination.create_namespaced_lease, namespace, body)
        if res.namespaced:
            fn = self.custom.create_namespaced_custom_object
            return await self._call(fn, res.group, res.version, namespace, res.plural, body)
        fn = self.custom.create_cluster_custom_object
        return await self._call(fn, res.group, res.version, res.plural, body)

    async def replace(self, res: Resource, body: JSON) -> JSON:
        """PUT with body's resourceVersion: ApiConflict if someone wrote in between."""
        meta = body["metadata"]
        if res == LEASES:
            fn = self.coordination.replace_namespaced_lease
            return await self._call(fn, meta["name"], meta["namespace"], body)
        if res.namespaced:
            fn = self.custom.replace_namespaced_custom_object
            args = (res.group, res.version, meta["namespace"], res.plural, meta["name"])
            return await self._call(fn, *args, body)
        fn = self.custom.replace_cluster_custom_object
        return await self._call(fn, res.group, res.version, res.plural, meta["name"], body)

    async def patch(
        self,
        res: Resource,
        name: str,
        body: Any,
        *,
        namespace: str | None = None,
        status: bool = False,
    ) -> JSON:
        """Merge patch for a dict body, JSON patch for a list body."""
        kwargs: JSON = {}
        if isinstance(body, list):
            kwargs["_content_type"] = "application/json-patch+json"
        if res == NODES:  # the core client would send a dict as a JSON patch
            kwargs.setdefault("_content_type", "application/merge-patch+json")
            return await self._call(self.core.patch_node, name, body, **kwargs)
        suffix = "_status" if status else ""
        if res.namespaced:
            fn = getattr(self.custom, f"patch_namespaced_custom_object{suffix}")
            args: tuple[Any, ...] = (res.group, res.version, namespace, res.plural, name)
        else:
            fn = getattr(self.custom, f"patch_cluster_custom_object{suffix}")
            args = (res.group, res.version, res.plural, name)
        return await self._call(fn, *args, body, **kwargs)

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        if res.namespaced:
            fn = self.custom.delete_namespaced_custom_object
            await self._call(fn, res.group, res.version, namespace, res.plural, name)
        else:
            fn = self.custom.delete_cluster_custom_object
            await self._call(fn, res.group, res.version, res.plural, name)

    async def event(self, namespace: str, body: JSON) -> None:
        """A core/v1 Event (best effort: events are for people, not for correctness)."""
        await self._call(self.core.create_namespaced_event, namespace, body)

    def watch_once(
        self,
        res: Resource,
        resource_version: str,
        on_event: Callable[[str, JSON], None],
        *,
        timeout: float,
        stopped: Callable[[], bool],
        **selectors: Any,
    ) -> str:
        """One watch request (blocking), from ``resource_version`` until the server ends it.

        Calls ``on_event(type, object)`` for ADDED/MODIFIED/DELETED; BOOKMARKs only move
        the version on. Returns the last version seen. Raises ApiGone when it is too old.
        """
        fn, args = self.list_function(res)
        w = watch.Watch()
        try:
            for event in w.stream(
                fn,
                *args,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, int(timeout)),
                _request_timeout=(self.timeout, timeout + self.timeout),
                **selectors,
            ):
                obj = event["raw_object"]
                resource_version = obj["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    on_event(event["type"], obj)
                if stopped():
                    w.stop()
        except Exception as exc:
            raise translate(exc) from exc
        return resource_version
