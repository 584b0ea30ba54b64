"""autocannon as serve.py's load generator (the default ``--driver``): the request bodies
(JSON and binary tensor data), one measurement of one endpoint at one concurrency through
cannon.js, and the server CPU each request cost (read from /proc for its process tree).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import median
from _servers import Endpoint, request

__all__ = ["Cell", "Sample", "cannon", "probe_infer", "write_bodies"]

HERE = Path(__file__).resolve().parent
HEADER_LENGTH = "Inference-Header-Content-Length"


def write_bodies(folder: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """body kind -> (file, headers). Both ask for the whole [1,10] output back."""
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    json_doc = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    json_file = folder / "body.json"
    json_file.write_text(json.dumps(json_doc))
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    bin_file = folder / "body.bin"
    bin_file.write_bytes(header + raw)
    return {
        "json": (json_file, {"Content-Type": "application/json"}),
        "binary": (
            bin_file,
            {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))},
        ),
    }


def probe_infer(endpoint: Endpoint, body: tuple[Path, dict[str, str]]) -> tuple[int, bytes]:
    path, headers = body
    return request(endpoint, "POST", endpoint.path, data=path.read_bytes(), headers=headers)


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    errors: int
    cpu_us: float = float("nan")  # server CPU time per request (all its processes)


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(root: int) -> float:
    """user+system CPU of a server's process tree (the server and its workers, which may
    sit in sessions of their own).

    Far steadier than req/s on a shared machine: it counts the work a request costs the
    server, not how much of the CPU the server happened to get."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])  # field 4: ppid
        ticks[pid] = int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    total = 0
    for pid, own in ticks.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == root:
            total += own
    return total / _TICK


def cannon(
    cli: Path, endpoint: Endpoint, body: tuple[Path, dict[str, str]], connections: int,
    duration: float, warmup: float,
) -> Sample:  # fmt: skip
    path, headers = body
    pids = [endpoint.root_pid, *endpoint.also_pids] if endpoint.root_pid else []
    cpu_before = sum(group_cpu_seconds(pid) for pid in pids) if pids else None
    opts = {
        "autocannon": str(cli.parent),
        "url": endpoint.url + endpoint.path,
        "socketPath": str(endpoint.socket) if endpoint.socket else None,
        "connections": connections,
        "duration": duration,
        "warmup": warmup,
        "headers": headers,
        "bodyFile": str(path),
    }
    done = subprocess.run(
        ["node", str(HERE / "cannon.js"), json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=duration + warmup + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannon failed on {endpoint.label}: {done.stderr[-2000:]}")
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    cpu_us = float("nan")
    if cpu_before is not None and endpoint.root_pid:
        answered = doc["requests"] + doc["non2xx"] + doc.get("warmup_requests", 0)
        cpu = sum(group_cpu_seconds(pid) for pid in pids) - cpu_before
        cpu_us = cpu / max(1, answered) * 1e6
    return Sample(
        doc["rps"], doc["p50_ms"] or float("nan"), doc["p99_ms"] or float("nan"),
        doc["non2xx"], doc["errors"] + doc["timeouts"], cpu_us,
    )  # fmt: skip


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return median([getattr(s, attr) for s in self.samples])
