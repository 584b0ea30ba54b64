"""Who is calling on the node socket: peer credentials -> PID -> cgroup -> pod -> namespace.

Models of a LocalModelNamespaceCache answer only to pods of its namespace, and a
LocalModelCache with ``allowedNamespaces`` only to pods of those. The kernel tells us the
caller's PID (SO_PEERCRED, which the caller cannot forge), held as that very process
(``serve.peers.connection_peer``, as shared memory does: a PID reused by another process is
refused, "reconnect"); the PID's cgroup path names its pod's UID (the kubelet's cgroupfs
and systemd layouts only); a watch of this node's pods maps the UID to a namespace.
Anything unknown is refused: fail closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from nodecache.agent.kube.watching import Informer
from nodecache.serve.http import CALLER
from nodecache.serve.peers import CallerGone, Peer, connection_peer, pod_uid_of

__all__ = ["CallerIdentity", "caller_middleware", "pod_uid_of"]


class CallerIdentity:
    """Maps a calling process to its pod's namespace through this node's pods."""

    def __init__(self, pods: Informer, proc_root: Path = Path("/proc")) -> None:
        self.pods = pods
        self.proc_root = proc_root

    def namespace_of(self, peer: Peer | None) -> str | None:
        """The namespace of ``peer``'s pod; CallerGone if the process exited while its
        cgroup was read (the read may then be another's)."""
        if peer is None:
            return None
        uid = pod_uid_of(peer.pid, self.proc_root)
        if not peer.alive():
            raise CallerGone()
        if uid is None:
            return None
        for pod in self.pods.items():
            if pod["metadata"].get("uid") == uid:
                return pod["metadata"].get("namespace")
        return None


def caller_middleware(identity: CallerIdentity) -> Any:
    """aiohttp middleware: the caller's namespace for the routing (``serve.http.CALLER``),
    found from its peer credentials only when a name depends on it, at most once a
    request. The routing answers what the caller may not use as undeclared (404) and
    lists only the rest. Reading the caller on the loop is a few small /proc reads (a Unix
    socket's peer only: no /proc walk)."""

    @web.middleware
    async def identify(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        found: list[str | None] = []

        def caller() -> str | None:
            if not found:
                peer = connection_peer(request.protocol, request.transport, tcp=False)
                found.append(identity.namespace_of(peer))
            return found[0]

        request[CALLER] = caller
        return await handler(request)

    return identify
