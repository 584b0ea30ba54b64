"""Who is calling on the node socket: peer credentials -> PID -> cgroup -> pod -> namespace.

Models of a LocalModelNamespaceCache answer only to pods of its namespace, and a
LocalModelCache with ``allowedNamespaces`` only to pods of those. The kernel tells us the
caller's PID (SO_PEERCRED, which the caller cannot forge); the PID's cgroup path names
its pod's UID (both the cgroupfs and the systemd layouts of the kubelet); a watch of this
node's pods maps the UID to a namespace. Anything unknown is refused: fail closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from nodecache.agent.kube.watching import Informer
from nodecache.serve.http import CALLER
from nodecache.serve.peers import peer_pid, pod_uid_of

__all__ = ["CallerIdentity", "caller_middleware", "peer_pid", "pod_uid_of"]


class CallerIdentity:
    """Maps a caller PID to its pod's namespace through this node's pods."""

    def __init__(self, pods: Informer, proc_root: Path = Path("/proc")) -> None:
        self.pods = pods
        self.proc_root = proc_root

    def namespace_of(self, pid: int | None) -> str | None:
        if pid is None:
            return None
        uid = pod_uid_of(pid, self.proc_root)
        if uid is None:
            return None
        for pod in self.pods.items():
            if pod["metadata"].get("uid") == uid:
                return pod["metadata"].get("namespace")
        return None


def caller_middleware(identity: CallerIdentity) -> Any:
    """aiohttp middleware: the caller's namespace for the routing (``serve.http.CALLER``),
    found from its peer credentials only when a name depends on it, at most once a
    request. The routing refuses what the caller may not use (403) and lists only the rest."""

    @web.middleware
    async def identify(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        found: list[str | None] = []

        def caller() -> str | None:
            if not found:
                found.append(identity.namespace_of(peer_pid(request.transport)))
            return found[0]

        request[CALLER] = caller
        return await handler(request)

    return identify
