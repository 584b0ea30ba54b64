"""Placement at scale: ``.venv/bin/python scripts/bench/placement.py [NODES] [CACHES]``.

Times ``placement.plan`` for a cluster of NODES nodes in 50 groups and CACHES caches:
a cold start (nothing placed), the steady state (every agent reports its copies warm),
and caches with no ``replicas`` (a copy on every node of their group).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nodecache.agent.kube.placement import plan

READY = {"conditions": [{"type": "Ready", "status": "True"}]}


def cluster(nodes: int, caches: int, replicas: int | None) -> tuple[list[Any], ...]:
    node_objs = [{"metadata": {"name": f"n{i}", "labels": {"rack": str(i % 50)}}, "status": READY}
                 for i in range(nodes)]  # fmt: skip
    groups = [{"metadata": {"name": f"g{r}"},
               "spec": {"nodeSelector": {"rack": str(r)}, "storageLimit": "4Ti"}}
              for r in range(50)]  # fmt: skip
    spec_extra = {} if replicas is None else {"replicas": replicas}
    cache_objs = [{"metadata": {"name": f"c{i}"},
                   "spec": {"sourceModelUri": f"s3://bucket/c{i}/", "modelSize": "10Gi",
                            "nodeGroups": [f"g{i % 50}"], "warm": {"minReplicas": 1},
                            **spec_extra}}
                  for i in range(caches)]  # fmt: skip
    return node_objs, groups, cache_objs


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    c = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    nodes, groups, caches = cluster(n, c, replicas=3)
    started = time.perf_counter()
    first = plan(caches, groups, nodes, [])
    cold = time.perf_counter() - started
    reports = [{"metadata": {"name": name}, "spec": {"localModels": entries},
                "status": {"modelStatus": {e["modelName"]: {"state": "Warm"} for e in entries},
                           "heartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "capacity": {"disk": {"free": 3 << 40},
                                        "devices": [{"name": "cuda:0", "free": 70 << 30}]}}}
               for name, entries in first.node_specs.items()]  # fmt: skip
    started = time.perf_counter()
    plan(caches, groups, nodes, reports)
    steady = time.perf_counter() - started
    nodes, groups, caches = cluster(n, c, replicas=None)
    started = time.perf_counter()
    every = plan(caches, groups, nodes, [])
    all_nodes = time.perf_counter() - started
    copies = sum(len(v) for v in every.node_specs.values())
    print(f"{n} nodes x {c} caches: cold {cold:.2f}s, steady {steady:.2f}s (3 copies each); "
          f"copy on every group node ({copies} copies) {all_nodes:.2f}s")  # fmt: skip


if __name__ == "__main__":
    main()
