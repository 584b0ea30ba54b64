"""Memory tier: runtimes, the model repository, and the Open Inference Protocol server.

``serve.Model`` is the base class for custom Python models.
"""

from nodecache.serve.model import Model

__all__ = ["Model"]
