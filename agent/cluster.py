"""Cluster mode: the node agent told what to hold by its LocalModelNode.

Same NodeAgent, socket and metrics as standalone; the declarations come from the API
server instead of a folder. The socket is up before the API server is first reached and
stays up while it is away: warm models keep answering, status catches up later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from nodecache.agent.declarations import refuse_duplicate_versions
from nodecache.agent.kube.api import (
    LOCAL_MODEL_CACHES,
    LOCAL_MODEL_NAMESPACE_CACHES,
    LOCAL_MODEL_NODES,
    NODES,
    PODS,
    Kube,
    connect,
)
from nodecache.agent.kube.callers import CallerIdentity, caller_middleware
from nodecache.agent.kube.errors import ApiError
from nodecache.agent.kube.labels import desired_labels, is_ours, label_patch, with_node_labels
from nodecache.agent.kube.nodestatus import (
    RequestRates,
    StatusWriter,
    disk_capacity,
    node_status,
    resolve,
)
from nodecache.agent.kube.secrets import SecretCredentials
from nodecache.agent.kube.watching import Informer
from nodecache.agent.node import NodeAgent
from nodecache.agent.services import NodeOptions, NodeServices
from nodecache.serve.loop import on_stop_signal

__all__ = ["ClusterOptions", "run_cluster"]

log = logging.getLogger(__name__)
LABEL_WRITES = Counter(
    "nodecache_kube_label_writes_total",
    "Patches of this node's model labels (cache.nodecache.io), by result (ok, failed).",
    ["result"],
)


@dataclass(frozen=True)
class ClusterOptions:
    node_name: str
    node: NodeOptions
    """How this node stores and serves models: the same settings as standalone."""
    kubeconfig: Path | None = None
    """None: in-cluster config, else $KUBECONFIG, else ~/.kube/config."""
    status_interval: float = 10.0
    """Least seconds between two status writes: at most 60/status_interval a minute."""
    heartbeat_interval: float = 30.0
    """A status write at least this often, changed or not."""
    watch_timeout: float = 300.0
    """Seconds one watch request lasts before it is renewed from its resourceVersion."""
    rate_window: float = 10.0
    """Seconds over which the request rate per model is reported."""
    proc_root: Path = Path("/proc")
    """Where callers' cgroups are read (the host's /proc: the DaemonSet runs with hostPID)."""
    namespace: str = "nodecache-system"
    """The agent's own namespace: a LocalModelCache's ``storage.secretRef`` is read there."""


async def run_cluster(options: ClusterOptions, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), following this node's LocalModelNode."""
    if not options.node_name:
        raise SystemExit("cluster mode needs the node name (--node-name or $NODE_NAME)")
    stop = stop or asyncio.Event()
    on_stop_signal(stop)
    kube = Kube(await asyncio.to_thread(connect, options.kubeconfig))
    node = await NodeServices.create(options.node)
    follower = NodeFollower(kube, node.agent, options, counts=node.request_counts)
    node.agent.credentials = SecretCredentials(kube, options.namespace)
    # Names resolve per caller's namespace: a namespaced cache answers only its namespace's
    # pods, and shadows a cluster cache of its name for them (added before the app freezes).
    identity = CallerIdentity(follower.pods, options.proc_root)
    node.app.middlewares.append(caller_middleware(identity))
    # gRPC cannot name its caller's pod: it sees only the cluster's open names.
    # CSI mounts resolve names with the same routing, for kubelet's podInfoOnMount namespace.
    node.node_name = options.node_name
    await node.start(mode="cluster", node=options.node_name)
    task = asyncio.create_task(follower.run())
    try:
        await stop.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await node.stop()
        kube.api.close()


class NodeFollower:
    """Watches the node's LocalModelNode and the caches; applies; reports status."""

    def __init__(
        self,
        kube: Kube,
        agent: NodeAgent,
        options: ClusterOptions,
        *,
        counts: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.kube, self.agent, self.options = kube, agent, options
        self.wake = asyncio.Event()
        self.node = Informer(
            kube,
            LOCAL_MODEL_NODES,
            on_change=self.wake.set,
            watch_timeout=options.watch_timeout,
            field_selector=f"metadata.name={options.node_name}",
        )
        self.caches = Informer(
            kube, LOCAL_MODEL_CACHES, on_change=self.wake.set, watch_timeout=options.watch_timeout
        )
        self.namespace_caches = Informer(
            kube,
            LOCAL_MODEL_NAMESPACE_CACHES,
            on_change=self.wake.set,
            watch_timeout=options.watch_timeout,
        )
        self.pods = Informer(
            kube,
            PODS,
            watch_timeout=options.watch_timeout,
            field_selector=f"spec.nodeName={options.node_name}",
        )
        self.access: dict[str, frozenset[str] | None] = {}
        self.origins: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.generation: int | None = None
        self.rates = RequestRates(options.rate_window, counts=counts)
        self.status = StatusWriter(
            kube,
            options.node_name,
            self.snapshot,
            min_interval=options.status_interval,
            heartbeat_interval=options.heartbeat_interval,
            after_write=NodeLabeler(kube, options.node_name).sync,
        )

    def snapshot(self) -> dict[str, Any]:
        return with_node_labels(
            node_status(
                self.agent.status(),
                disk=disk_capacity(self.options.node.cache_dir),
                origins=self.origins,
                errors=self.errors,
                generation=self.generation,
                rates=self.rates.rates(),
            )
        )

    async def run(self) -> None:
        informers = (self.node, self.caches, self.namespace_caches, self.pods)
        tasks = [asyncio.create_task(i.run()) for i in informers]
        tasks.append(asyncio.create_task(self.status.run()))
        try:
            await self._follow()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            try:
                await self._follow_changes()
            except Exception:  # keep following: the next change gets a fresh try
                log.exception("applying the LocalModelNode failed; retrying")
                await asyncio.sleep(1.0)
                self.wake.set()

    async def _follow_changes(self) -> None:
        informers = (self.node, self.caches, self.namespace_caches)
        collected = warned = False
        applied: Any = None
        while True:
            await self.wake.wait()
            await asyncio.sleep(0.05)  # let a burst of events land: one apply for all
            self.wake.clear()
            if not all(i.synced.is_set() for i in informers):
                continue
            node = self.node.get(self.options.node_name)
            if node is None:  # keep what is there until a LocalModelNode says otherwise
                if not warned:
                    log.warning(
                        "no LocalModelNode for this node yet; the reconciler creates one when "
                        "the node matches a LocalModelNodeGroup's nodeSelector",
                        extra={"node": self.options.node_name},
                    )
                    warned = True
                continue
            caches = {**self.caches.objects, **self.namespace_caches.objects}
            resolved = resolve(node, caches)
            resolved.declarations, refused = refuse_duplicate_versions(resolved.declarations)
            for key, reason in refused.items():  # reported under the entry's modelName
                resolved.errors[resolved.origins.pop(key).split("/", 1)[1]] = reason
            self.generation = node["metadata"].get("generation")
            self.origins, self.errors = resolved.origins, resolved.errors
            self.access.clear()
            self.access.update(resolved.access)
            if (resolved.declarations, resolved.errors) != applied:
                await self.agent.apply(
                    resolved.declarations,
                    origins=resolved.origins,
                    errors=resolved.errors,
                    access=resolved.access,
                )
                applied = (resolved.declarations, resolved.errors)
            if resolved.complete and not collected:
                await self.agent.collect_garbage()  # leftovers from before a restart
                collected = True
            self.status.wake.set()


class NodeLabeler:
    """Keeps this node's ``cache.nodecache.io`` labels equal to the models it holds.

    Called after each status write: one patch for however many models changed, none when
    no label did, so labels never cost more writes than status. Labels of others are left
    alone (a merge patch names only ours), and ours left over from before a restart go.
    """

    def __init__(self, kube: Kube, node_name: str) -> None:
        self.kube, self.node_name = kube, node_name
        self.current: dict[str, str] | None = None  # ours on the Node, None: read it first
        self._failing = ""

    async def sync(self, status: dict[str, Any]) -> None:
        try:
            if self.current is None:
                self.current = self._ours(await self.kube.get(NODES, self.node_name))
            patch = label_patch(self.current, desired_labels(status))
            if patch is None:
                return
            self.current = self._ours(await self.kube.patch(NODES, self.node_name, patch))
            LABEL_WRITES.labels("ok").inc()
            self._failing = ""
        except ApiError as exc:  # status was written; labels follow with the next write
            self.current = None
            LABEL_WRITES.labels("failed").inc()
            if str(exc) != self._failing:  # once per cause, not once per status write
                log.warning("node labels not written", extra={"error": str(exc)})
            self._failing = str(exc)

    @staticmethod
    def _ours(node: dict[str, Any]) -> dict[str, str]:
        return {k: v for k, v in (node["metadata"].get("labels") or {}).items() if is_ours(k)}
