"""Memory tier: runtimes, the model repository, and the Open Inference Protocol server.

``serve.Model`` is the base class for custom Python models.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodecache.serve.model import Model

__all__ = ["Model"]


def __getattr__(name: str) -> Any:
    """``Model`` on first use: importing it pulls in numpy, which commands
    that never serve (``nodecache prefetch``, ``nodecache verify``) should not pay."""
    if name == "Model":
        from nodecache.serve.model import Model

        return Model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
