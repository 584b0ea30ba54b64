"""The CSI v1 Identity and Node services of driver ``csi.nodecache.io`` on a Unix socket.

Thin gRPC adapters over ``Volumes``: each call is checked (``requests.py``), logged with
its volume id and pod, and its refusal mapped to the status code the CSI spec gives. Only
inline ephemeral volumes exist: no controller, no staging, no plugin or node capabilities;
every other RPC answers UNIMPLEMENTED (the generated base classes do that).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import grpc

from nodecache.agent.csi import csi_pb2 as pb
from nodecache.agent.csi import csi_pb2_grpc as pb_grpc
from nodecache.agent.csi.backend import CsiBackend
from nodecache.agent.csi.requests import RequestError, parse_publish, parse_unpublish, pod_label
from nodecache.agent.csi.volumes import Volumes

__all__ = ["DRIVER_NAME", "CsiServer", "IdentityService", "NodeService", "socket_path"]

log = logging.getLogger(__name__)

DRIVER_NAME = "csi.nodecache.io"
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL

Reply = TypeVar("Reply")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Reply]]


def _plugin_version() -> str:
    try:
        return version("nodecache")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _logged(method: Handler[Reply]) -> Handler[Reply]:
    """Log the call with its volume id and pod; turn a RequestError into its status code
    and anything unexpected into INTERNAL (logged with its traceback)."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Reply:
        volume = getattr(request, "volume_id", "")
        pod = pod_label(getattr(request, "volume_context", {}))
        try:
            reply = await method(self, request, context)
        except RequestError as exc:
            log.info(
                "csi %s volume=%s pod=%s: %s %s", name, volume, pod, exc.code.name, exc.message
            )
            await context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("csi %s volume=%s pod=%s failed", name, volume, pod)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if volume:
            log.info("csi %s volume=%s pod=%s: OK", name, volume, pod)
        else:
            log.debug("csi %s: OK", name)
        return reply

    return call


class IdentityService(pb_grpc.IdentityServicer):
    """Who the plugin is and whether it is ready."""

    def __init__(self, backend: CsiBackend) -> None:
        self.backend = backend

    @_logged
    async def GetPluginInfo(self, request: Any, context: Any) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=_plugin_version())

    @_logged
    async def GetPluginCapabilities(
        self, request: Any, context: Any
    ) -> pb.GetPluginCapabilitiesResponse:
        # None: no CONTROLLER_SERVICE (inline ephemeral volumes need none) and no topology
        # (a volume is only ever published on the node that serves it).
        return pb.GetPluginCapabilitiesResponse()

    @_logged
    async def Probe(self, request: Any, context: Any) -> pb.ProbeResponse:
        reply = pb.ProbeResponse()
        reply.ready.value = self.backend.ready()
        return reply


class NodeService(pb_grpc.NodeServicer):
    """Publish and unpublish; the rest of the Node service is UNIMPLEMENTED."""

    def __init__(self, backend: CsiBackend, volumes: Volumes) -> None:
        self.backend = backend
        self.volumes = volumes

    @_logged
    async def NodeGetCapabilities(
        self, request: Any, context: Any
    ) -> pb.NodeGetCapabilitiesResponse:
        # None: no staging (a bind mount needs no per-node setup), no stats, no expansion.
        return pb.NodeGetCapabilitiesResponse()

    @_logged
    async def NodeGetInfo(self, request: Any, context: Any) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self.backend.node_name)

    @_logged
    async def NodePublishVolume(self, request: Any, context: Any) -> pb.NodePublishVolumeResponse:
        await self.volumes.publish(parse_publish(request))
        return pb.NodePublishVolumeResponse()

    @_logged
    async def NodeUnpublishVolume(
        self, request: Any, context: Any
    ) -> pb.NodeUnpublishVolumeResponse:
        await self.volumes.unpublish(*parse_unpublish(request))
        return pb.NodeUnpublishVolumeResponse()


def socket_path(endpoint: str) -> Path:
    """The socket path of a kubelet-style endpoint, ``unix:///csi/csi.sock`` (or
    ``unix:/csi/csi.sock``)."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            path = endpoint[len(prefix) :]
            break
    else:
        raise ValueError(f"CSI endpoint must be unix:///ABSOLUTE/PATH, not {endpoint!r}")
    if not path.startswith("/"):
        raise ValueError(f"CSI endpoint must name an absolute path: {endpoint!r}")
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ValueError(f"CSI socket path is over {_MAX_UNIX_PATH} bytes: {path}")
    return Path(path)


class CsiServer:
    """The Identity and Node services on ``endpoint``; ``volumes.mounts()`` for status."""

    def __init__(self, backend: CsiBackend, endpoint: str) -> None:
        self.path = socket_path(endpoint)
        self.volumes = Volumes(backend)
        self._server = grpc.aio.server()
        pb_grpc.add_IdentityServicer_to_server(IdentityService(backend), self._server)
        pb_grpc.add_NodeServicer_to_server(NodeService(backend, self.volumes), self._server)

    async def start(self) -> None:
        """Find the volumes of a previous run, then listen (only root may connect: the
        socket can mount folders into pods)."""
        await self.volumes.recover()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()  # left by a previous run; kubelet reconnects
        except FileNotFoundError:
            pass
        self._server.add_insecure_port(f"unix:{self.path}")
        await self._server.start()
        os.chmod(self.path, 0o600)
        log.info("csi: driver %s listening on unix://%s", DRIVER_NAME, self.path)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening; mounts stay (pods keep running), the next start finds them."""
        await self._server.stop(grace)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
