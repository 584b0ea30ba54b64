"""What the CSI node service needs from the agent: the interface it is driven through.

The service (``service.py``) knows CSI, gRPC and mounts; it knows nothing of caches, stores
or declarations. The agent implements this protocol over its node loop and its store, and
tests implement it over a plain folder. Every method is called on the event loop and must
return quickly (no network, no hashing): start work in the background instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

__all__ = ["CsiBackend", "NotFound", "PermissionDenied"]


class NotFound(LookupError):
    """No cache declares this model: the pod names something that does not exist."""


class PermissionDenied(PermissionError):
    """The model exists but is not for the pod's namespace (a namespaced cache of another
    namespace, or a cluster cache whose ``allowedNamespaces`` does not list it)."""


class CsiBackend(Protocol):
    """The node agent as the CSI service sees it."""

    @property
    def node_name(self) -> str:
        """This node's name: the ``node_id`` kubelet registers the driver under."""
        ...

    @property
    def socket_dir(self) -> Path:
        """The folder holding the node socket, ``nodecache.sock``: what a ``socket: "true"``
        volume mounts."""
        ...

    @property
    def state_dir(self) -> Path:
        """A folder on the node's disk that outlives the agent process (in the cache dir):
        the service keeps its record of published volumes there, to find them again after
        a restart."""
        ...

    def ready(self) -> bool:
        """Whether the agent has finished starting (declarations read, store opened): what
        ``Probe`` reports. Publishing before that may answer NOT_FOUND wrongly."""
        ...

    def resolve(self, name: str, namespace: str) -> Path | None:
        """The verified folder of model ``name`` for a pod of ``namespace``, resolved exactly
        as the node socket resolves it for a caller of that namespace; None when the model is
        declared and visible but not (yet) verified on this node.

        Raises NotFound for an undeclared name and PermissionDenied when the namespace may
        not use it (checked before the on-disk state, so nothing leaks to other namespaces).
        """
        ...

    def start_fetch(self, name: str, namespace: str) -> str:
        """Start fetching a declared model that is not on this node yet (no-op when a fetch
        is already running, or when this node is not in the cache's node groups) and return
        its progress for a human, e.g. ``"37% of 1.2 GiB"`` or ``"queued"``, or why nothing
        is coming (``"this node is not in the cache's node groups"``)."""
        ...

    def pin(self, volume_id: str, name: str, namespace: str) -> None:
        """Keep model ``name``'s files (as a pod of ``namespace`` means it) exactly as they
        are while volume ``volume_id`` has them mounted: quota eviction skips them and a
        deleted declaration leaves them in place. Idempotent per volume id. Pins live in
        memory: after a restart the service pins the volumes it finds still mounted again,
        whether or not ``name`` is still declared."""
        ...

    def unpin(self, volume_id: str) -> None:
        """Release ``volume_id``'s pin (no-op for an unknown id); once a model has no pins,
        normal policy (eviction, removal of undeclared models) applies again."""
        ...
