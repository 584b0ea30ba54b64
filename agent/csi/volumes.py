"""Publishing and unpublishing volumes: resolve, pin, record, mount, and the way back.

Idempotent and restart-safe as kubelet requires: the same publish twice is one mount and
the same answer; unpublishing what is not there succeeds; after a restart the volumes that
are still mounted are found again from the state file and ``/proc/self/mountinfo``, and
their models pinned again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc

from nodecache.agent.csi.backend import CsiBackend, NotFound, PermissionDenied
from nodecache.agent.csi.mounts import bind_readonly, is_mount_point, unmount
from nodecache.agent.csi.requests import Publish, RequestError
from nodecache.agent.csi.state import Volume, VolumeState

__all__ = ["Volumes"]

log = logging.getLogger(__name__)


def _mount(source: Path, target: str) -> None:
    """Create ``target`` (kubelet creates only its parent) and bind ``source`` there."""
    path = Path(target)
    path.mkdir(exist_ok=True)
    try:
        bind_readonly(source, path)
    except OSError:
        path.rmdir()
        raise


def _teardown(target: str) -> None:
    """Unmount everything stacked at ``target``, then remove the folder the driver made."""
    path = Path(target)
    while is_mount_point(path):
        unmount(path)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


class Volumes:
    """The volumes this node has published; one publish or unpublish at a time (each is a
    few syscalls, and serialising them makes the idempotency checks exact)."""

    def __init__(self, backend: CsiBackend) -> None:
        self.backend = backend
        self.state = VolumeState(backend.state_dir)
        self._lock = asyncio.Lock()

    async def recover(self) -> None:
        """Find the volumes published before a restart: keep (and pin again) those still
        mounted, forget the records whose mount is gone."""
        async with self._lock:
            await asyncio.to_thread(self.state.load)
            for volume in list(self.state.volumes.values()):
                if await asyncio.to_thread(is_mount_point, Path(volume.target)):
                    if volume.model is not None:
                        namespace = volume.pod.partition("/")[0]
                        self.backend.pin(volume.volume_id, volume.model, namespace)
                    log.info(
                        "csi: found %s of pod %s at %s", _what(volume), volume.pod, volume.target
                    )
                else:
                    await asyncio.to_thread(self.state.remove, volume.target)
                    log.info(
                        "csi: forgot %s of pod %s: %s is no longer mounted",
                        _what(volume),
                        volume.pod,
                        volume.target,
                    )

    def mounts(self, key_of: Callable[[str, str], str] | None = None) -> dict[str, int]:
        """Mounts per model, for the agent's status: per name the pods asked for, or per
        ``key_of(name, pod namespace)`` (the model a served name meant for the pod)."""
        return dict(
            Counter(
                key_of(v.model, v.pod.partition("/")[0]) if key_of else v.model
                for v in self.state.volumes.values()
                if v.model
            )
        )

    async def publish(self, request: Publish) -> None:
        """Mount what ``request`` asks for at its target, or raise RequestError."""
        volume = Volume(request.volume_id, request.target, request.model, request.pod)
        async with self._lock:
            existing = self.state.volumes.get(request.target)
            if existing is not None and not existing.same_publish(volume):
                raise RequestError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"target_path {request.target} already holds volume {existing.volume_id} "
                    f"({_what(existing)})",
                )
            mounted = await asyncio.to_thread(is_mount_point, Path(request.target))
            if existing is not None and mounted:
                return  # the same publish again: one mount, the same answer
            if mounted:
                raise RequestError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"target_path {request.target} holds a mount this driver did not make",
                )
            source = self._source(request)
            await asyncio.to_thread(self.state.put, volume)
            try:
                await asyncio.to_thread(_mount, source, request.target)
            except OSError as exc:
                await self._forget(volume)
                raise RequestError(
                    grpc.StatusCode.INTERNAL, f"mounting {_what(volume)}: {exc}"
                ) from exc
            log.info("csi: mounted %s for pod %s at %s", _what(volume), volume.pod, volume.target)

    def _source(self, request: Publish) -> Path:
        """The folder to mount, with the model pinned; UNAVAILABLE while it is fetched."""
        if request.model is None:
            return self.backend.socket_dir
        if not self.backend.ready():
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the node agent is starting")
        name = request.model
        path = self._resolve(name, request.namespace)
        if path is not None:
            self.backend.pin(request.volume_id, name, request.namespace)
            # Resolved again under the pin: an eviction may have run in between.
            path = self._resolve(name, request.namespace)
            if path is not None:
                return path
            self.backend.unpin(request.volume_id)
        progress = self.backend.start_fetch(name, request.namespace)
        raise RequestError(grpc.StatusCode.UNAVAILABLE, f"fetching {name}: {progress}")

    def _resolve(self, name: str, namespace: str) -> Path | None:
        try:
            return self.backend.resolve(name, namespace)
        except NotFound as exc:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"model {name!r} is not declared by any cache"
            ) from exc
        except PermissionDenied as exc:
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"model {name!r} is not available to pods of namespace {namespace!r}",
            ) from exc

    async def unpublish(self, volume_id: str, target: str) -> None:
        """Undo a publish; succeed when there is nothing to undo."""
        async with self._lock:
            existing = self.state.volumes.get(target)
            if existing is not None and existing.volume_id != volume_id:
                log.warning(
                    "csi: %s holds volume %s, not %s: left alone",
                    target,
                    existing.volume_id,
                    volume_id,
                )
                return
            try:
                await asyncio.to_thread(_teardown, target)
            except OSError as exc:
                raise RequestError(grpc.StatusCode.INTERNAL, f"unmounting {target}: {exc}") from exc
            if existing is not None:
                await self._forget(existing)
                log.info(
                    "csi: unmounted %s of pod %s from %s", _what(existing), existing.pod, target
                )
            elif not self._holds(volume_id):
                self.backend.unpin(volume_id)  # a mount made before the state file was lost

    async def _forget(self, volume: Volume) -> None:
        await asyncio.to_thread(self.state.remove, volume.target)
        if volume.model is not None and not self._holds(volume.volume_id):
            self.backend.unpin(volume.volume_id)

    def _holds(self, volume_id: str) -> bool:
        return any(v.volume_id == volume_id for v in self.state.volumes.values())


def _what(volume: Volume) -> str:
    return f"model {volume.model}" if volume.model is not None else "the socket folder"
