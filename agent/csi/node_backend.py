"""The CSI service's backend over the real node: the declarations the node loop follows, the
disk store, and the node socket's routing (``serve.routing``): a ``model:`` volume of a pod
means what that name means to the pod on the socket (its namespace's cache first, a cluster
cache's allowed namespaces), and the version taking most of the name's traffic.

Pins are leases on the store (``ModelStore.use``), so quota eviction skips a mounted model and
removing its declaration leaves its files in place; the model's source URI is kept per volume
in ``<state_dir>/csi-pins.json``, so a volume found still mounted after a restart pins its
files again even when no declaration names them any more. Once an undeclared model loses its
last pin, its files go, as they would have when it was undeclared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from nodecache.agent.csi.backend import NotFound, PermissionDenied
from nodecache.agent.node import NodeAgent
from nodecache.cache import CacheError, ModelStore
from nodecache.serve.errors import ModelNotFound
from nodecache.serve.spec import ModelState

__all__ = ["NodeCsiBackend"]

log = logging.getLogger(__name__)


class NodeCsiBackend:
    """:class:`~nodecache.agent.csi.backend.CsiBackend` over a running node."""

    def __init__(
        self,
        agent: NodeAgent,
        store: ModelStore,
        *,
        node_name: str,
        socket_dir: Path,
        state_dir: Path,
    ) -> None:
        self.agent, self.store = agent, store
        self._node_name, self._socket_dir, self._state_dir = node_name, socket_dir, state_dir
        self._holds: dict[str, contextlib.ExitStack] = {}  # volume id -> its store lease
        self._pins: dict[str, str] = self._load_pins()  # volume id -> source URI
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what the service reads -----------------------------------------------------------

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def socket_dir(self) -> Path:
        return self._socket_dir

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    def ready(self) -> bool:
        """Once the node loop has applied its first declarations: before that, every model
        would look undeclared."""
        return self.agent.applied

    def _key(self, name: str, namespace: str) -> str:
        """The model a pod of ``namespace`` reaches as ``name`` on the node socket: its
        version with the most traffic (a volume holds one)."""
        try:
            routes = self.agent.router.table.versions(name, lambda: namespace)
        except ModelNotFound:  # also another namespace's: it is not told it exists
            raise NotFound(name) from None
        return max(routes, key=lambda r: r.traffic).key

    def model_key(self, name: str, namespace: str) -> str:
        """The node's key of what ``name`` means to a pod of ``namespace`` now (``name``
        itself when it means nothing any more: a volume outliving its declaration)."""
        try:
            return self._key(name, namespace)
        except (NotFound, PermissionDenied):
            return name

    def resolve(self, name: str, namespace: str) -> Path | None:
        decl = self.agent.declaration(self._key(name, namespace))
        if decl is None:
            raise NotFound(name)
        stored = self.store.lookup(decl.store_uri)
        return stored.path if stored is not None else None

    def start_fetch(self, name: str, namespace: str) -> str:
        """Every declared model is already being brought up by the node loop (standalone:
        on every node; cluster: on the nodes placement chose): report how far it is."""
        try:
            status = self.agent.progress(self._key(name, namespace))
        except (NotFound, PermissionDenied):
            status = None
        if status is None:
            return "not declared for this node"
        if status.state == ModelState.DOWNLOADING:
            if status.bytes_total:
                share = 100 * status.bytes_done // max(1, status.bytes_total)
                return f"{share}% of {_size(status.bytes_total)}"
            return f"{_size(status.bytes_done)} so far"
        if status.state == ModelState.ERROR:
            return f"failed ({status.error}); retrying"
        return "queued"

    # -- pins -----------------------------------------------------------------------------

    def pin(self, volume_id: str, name: str, namespace: str) -> None:
        if volume_id in self._holds:
            return
        try:
            decl = self.agent.declaration(self._key(name, namespace))
        except (NotFound, PermissionDenied):
            decl = None
        uri = decl.store_uri if decl is not None else self._pins.get(volume_id)
        if uri is None:
            log.warning("csi: cannot pin %s: model %s is not declared", volume_id, name)
            return
        hold = contextlib.ExitStack()
        try:
            hold.enter_context(self.store.use(uri))
        except KeyError:
            return  # not on disk: the service answers UNAVAILABLE and unpins
        self._holds[volume_id] = hold
        if self._pins.get(volume_id) != uri:
            self._pins[volume_id] = uri
            self._save_pins()

    def unpin(self, volume_id: str) -> None:
        hold = self._holds.pop(volume_id, None)
        uri = self._pins.pop(volume_id, None)
        if hold is not None:
            hold.close()
        if uri is not None:
            self._save_pins()
            self._collect(uri)

    def mounted_models(self) -> set[str]:
        """Source URIs some volume holds (never garbage while mounted)."""
        return set(self._pins.values())

    def _collect(self, uri: str) -> None:
        """The last pin on an undeclared model went: its files go now, as they would have."""
        declared = any(d.store_uri == uri for d in self.agent.declarations())
        if declared or self.store.in_use(uri):
            return

        async def remove() -> None:
            try:
                if await asyncio.to_thread(self.store.remove, uri):
                    log.info("csi: undeclared model deleted after its last unmount")
            except CacheError as exc:
                log.warning("csi: undeclared model kept on disk", extra={"reason": str(exc)})

        task = asyncio.get_running_loop().create_task(remove())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the pin file ---------------------------------------------------------------------

    @property
    def _pin_file(self) -> Path:
        return self._state_dir / "csi-pins.json"

    def _load_pins(self) -> dict[str, str]:
        try:
            doc = json.loads(self._pin_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("csi: pin file unreadable, starting empty", extra={"error": str(exc)})
            return {}
        if not isinstance(doc, dict):
            return {}
        return {str(k): str(v) for k, v in doc.items() if isinstance(v, str)}

    def _save_pins(self) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._pin_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._pins))
        os.replace(tmp, self._pin_file)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
