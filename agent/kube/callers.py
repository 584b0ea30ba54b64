"""Who is calling on the node socket: peer credentials -> PID -> cgroup -> pod -> namespace.

Models of a LocalModelNamespaceCache answer only to pods of its namespace, and a
LocalModelCache with ``allowedNamespaces`` only to pods of those. The kernel tells us the
caller's PID (SO_PEERCRED, which the caller cannot forge); the PID's cgroup path names
its pod's UID (both the cgroupfs and the systemd layouts of the kubelet); a watch of this
node's pods maps the UID to a namespace. Anything unknown is refused: fail closed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from nodecache.agent.kube.watching import Informer
from nodecache.serve.peers import peer_pid, pod_uid_of

__all__ = ["REPOSITORY_INDEX", "CallerIdentity", "namespace_guard", "peer_pid", "pod_uid_of"]

Access = Callable[[str], frozenset[str] | None]  # model -> allowed namespaces (None: all)


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


REPOSITORY_INDEX = "/v2/repository/index"


def namespace_guard(access: Access, identity: CallerIdentity) -> Any:
    """aiohttp middleware: 403 for a namespaced model when the caller's pod is elsewhere,
    and a repository index that lists only the models the caller may use."""

    def visible(namespace: str | None, entry: Any) -> bool:
        allowed = access(str(entry.get("name", ""))) if isinstance(entry, dict) else None
        return allowed is None or namespace in allowed

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == REPOSITORY_INDEX:
            response = await handler(request)
            if response.status != 200 or not isinstance(response, web.Response):
                return response
            entries = json.loads(response.body or b"[]")  # type: ignore[arg-type]
            namespace = identity.namespace_of(peer_pid(request.transport))
            shown = [e for e in entries if visible(namespace, e)]
            return web.json_response(shown)
        model = request.match_info.get("name")
        allowed = access(model) if model else None
        if allowed is not None:
            namespace = identity.namespace_of(peer_pid(request.transport))
            if namespace not in allowed:
                caller = (
                    f"a pod of namespace {namespace}"
                    if namespace
                    else "not a known pod of this node (or not on the node socket)"
                )
                message = (
                    f"model {model} answers only to pods of namespace(s) "
                    f"{', '.join(sorted(allowed))}; the caller is {caller}"
                )
                return web.json_response({"error": message}, status=403)
        return await handler(request)

    return guard
