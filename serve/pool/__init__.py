"""Co-located model servers: worker processes the agent supervises and routes to.

``messages`` is the control protocol both ends share, ``client`` the agent's end of it,
``supervisor`` keeps the processes, ``policy`` decides homes, routes and copies (pure),
``spreading`` makes and drops copies of hot models, ``metrics`` merges the workers' metrics,
``pool`` composes them into ``WorkerPool`` (a ``ModelHost``), and ``dataplane`` serves the
Open Inference Protocol over it, for REST and gRPC alike.
"""

from __future__ import annotations

from nodecache.serve.pool.dataplane import PoolDataPlane, build_router_app
from nodecache.serve.pool.policy import worker_devices
from nodecache.serve.pool.pool import WorkerPool

__all__ = ["PoolDataPlane", "WorkerPool", "build_router_app", "worker_devices"]
