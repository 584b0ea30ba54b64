#!/usr/bin/env python3
"""Serving benchmark (issue 6): ours vs MLServer, KServe and a bare handler, one run.

Same tiny ONNX MLP (FP32 [1,64] -> [1,10]) everywhere, same session options (one
intra-op thread), same load generator (autocannon from npm, driven by cannon.js so each
latency keeps sub-millisecond resolution), JSON and binary bodies, concurrency 1 and 16.
Repeats go round-robin over every server so slow drift in machine load hits all alike.

    .venv/bin/python scripts/bench/serve.py                       # 3 x 20 s, as issue 6 asks
    .venv/bin/python scripts/bench/serve.py --duration 5 --repeats 1   # a quick look
    .venv/bin/python scripts/bench/serve.py --only ours,bare
    .venv/bin/python scripts/bench/serve.py --driver perf_analyzer --tensor-mib 16 \
        --concurrency 1,4 --duration 5          # Triton's load generator; shm vs binary

Servers: ours (agent, in-process model: UDS and TCP), proxy (`nodecache proxy` on TCP in
front of ours' node socket, as in a KServe pod: its added cost), ours --workers 1 (node socket ->
router -> worker process: the routing cost), ours --workers 2 (the hot model gets a copy
on the second worker; not in the default set), MLServer 1.7.1 (custom runtime,
parallel_workers 0, own venv), KServe 0.21.0 ModelServer (kserve.Model, logging off, own
venv), and a bare aiohttp handler calling onnxruntime on the event loop (the ceiling).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, ensure_autocannon, ensure_venv, loadavg, log, median, table, verdict
from _perf_analyzer import drive

HERE = Path(__file__).resolve().parent
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
MODEL = "mlp"
INFER_PATH = f"/v2/models/{MODEL}/infer"
PROXY_NAME = "mlp-isvc"  # the InferenceService's name the proxy maps to MODEL
HEADER_LENGTH = "Inference-Header-Content-Length"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- request bodies -----------------------------------------------------------------


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


# -- servers ------------------------------------------------------------------------


@dataclass
class Endpoint:
    label: str
    url: str  # http://host:port or http://localhost (with socket)
    socket: Path | None = None
    root_pid: int | None = None  # the server's first process, for CPU accounting
    also_pids: list[int] = field(default_factory=list)  # more process trees its requests use
    path: str = INFER_PATH


@dataclass
class Server:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    pid: int | None = None  # the process that answers (profiled with its children)
    grpc_url: str | None = None  # host:port of its gRPC on TCP, if asked

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


# The nodecache source tree ours runs from (--tree): a clean export of a commit keeps the
# numbers independent of whatever is being edited in the working tree.
TREE = ROOT


def _spawn(command: list[str], log_file: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    out = log_file.open("ab")
    env = dict(os.environ, PYTHONPATH=str(TREE))
    # Own process group, so stopping a server stops its children (workers) too.
    return subprocess.Popen(
        command, cwd=cwd or TREE, stdout=out, stderr=out, env=env, start_new_session=True
    )


async def _request(endpoint: Endpoint, method: str, path: str, **kw: object) -> tuple[int, bytes]:
    connector = aiohttp.UnixConnector(path=str(endpoint.socket)) if endpoint.socket else None
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, endpoint.url + path, **kw) as resp,  # type: ignore[arg-type]
    ):
        return resp.status, await resp.read()


def request(endpoint: Endpoint, method: str, path: str, **kw: object) -> tuple[int, bytes]:
    return asyncio.run(_request(endpoint, method, path, **kw))


def wait_until(server: Server, check: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for proc in server.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited {proc.returncode} while waiting for {what}"
                )
        try:
            if check():  # type: ignore[operator]
                return
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: timed out waiting for {what}")
        time.sleep(0.2)


def probe_infer(endpoint: Endpoint, body: tuple[Path, dict[str, str]]) -> tuple[int, bytes]:
    path, headers = body
    return request(endpoint, "POST", endpoint.path, data=path.read_bytes(), headers=headers)


def start_ours(
    home: Path, model_dir: Path, *, workers: int | None, tcp: bool, grpc: bool = False
) -> Server:
    name = f"ours --workers {workers}" if workers else "ours"
    home.mkdir(parents=True, exist_ok=True)
    declarations = home / "declarations"
    declarations.mkdir(exist_ok=True)
    declaration = {
        "apiVersion": "nodecache.io/v1alpha1",
        "kind": "LocalModelCache",
        "metadata": {"name": MODEL},
        "spec": {
            "sourceModelUri": model_dir.as_uri() + "/",
            "modelSize": "1Mi",
            "nodeGroups": ["default"],
            "format": "onnx",
        },
    }
    (declarations / "mlp.yaml").write_text(json.dumps(declaration))
    socket_dir = home / "run"
    command = [
        str(PROJECT_PY), "-m", "nodecache.agent.cli", "agent",
        "--declarations", str(declarations),
        "--cache-dir", str(home / "cache"),
        "--socket-dir", str(socket_dir),
        "--metrics-port", "0",
        "--log-format", "json",
        "--log-level", "warning",
    ]  # fmt: skip
    port = free_port() if tcp else None
    if port is not None:
        command += ["--http-port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    grpc_port = free_port() if grpc else None
    if grpc_port is not None:
        command += ["--grpc-port", str(grpc_port)]
    server = Server(name, [_spawn(command, home / "agent.log")])
    if grpc_port is not None:
        server.grpc_url = f"127.0.0.1:{grpc_port}"
    uds = Endpoint(f"{name} UDS", "http://localhost", socket_dir / "nodecache.sock")
    server.endpoints.append(uds)
    if port is not None:
        server.endpoints.append(Endpoint(f"{name} TCP", f"http://127.0.0.1:{port}"))
    server.pid = server.procs[0].pid

    def state() -> str | None:
        code, data = request(uds, "GET", "/nodecache/v1/status")
        if code != 200:
            return None
        models = json.loads(data)["models"]
        return next((m["state"] for m in models if m["name"] == MODEL), None)

    wait_until(server, lambda: state() in ("Downloaded", "Loading", "Warm"), f"{name} model")
    wait_until(server, lambda: request(uds, "POST", f"/v2/repository/models/{MODEL}/load")[0]
               == 200, f"{name} load")  # fmt: skip
    wait_until(server, lambda: state() == "Warm", f"{name} warm")
    return server


def start_proxy(home: Path, ours: Server, socket_dir: Path) -> Server:
    """`nodecache proxy` on TCP in front of ours' node socket (the KServe runtime's hop),
    under another name, so the renaming is paid for too. Its CPU counts the agent's."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        str(PROJECT_PY), "-m", "nodecache.agent.cli", "proxy",
        "--model", MODEL, "--served-name", PROXY_NAME,
        "--listen", f"127.0.0.1:{port}", "--socket-dir", str(socket_dir),
        "--log-level", "warning",
    ]  # fmt: skip
    server = Server("proxy", [_spawn(command, home / "proxy.log")])
    assert ours.pid is not None
    tcp = Endpoint("proxy TCP", f"http://127.0.0.1:{port}", also_pids=[ours.pid],
                   path=f"/v2/models/{PROXY_NAME}/infer")  # fmt: skip
    server.endpoints = [tcp]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", "/v2/health/ready")[0] == 200, "proxy")
    return server


def start_bare(home: Path, model: Path) -> Server:
    port, sock = free_port(), home / "bare.sock"
    sock.unlink(missing_ok=True)
    command = [str(PROJECT_PY), str(HERE / "_serve_peers.py"), "bare", str(model), str(port),
               str(sock)]  # fmt: skip
    server = Server("bare aiohttp+ort", [_spawn(command, home / "bare.log")])
    tcp = Endpoint("bare aiohttp+ort TCP", f"http://127.0.0.1:{port}")
    server.endpoints = [tcp, Endpoint("bare aiohttp+ort UDS", "http://localhost", sock)]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", "/v2/health/live")[0] == 200, "bare server")
    return server


def start_kserve(home: Path, model: Path) -> Server:
    python = ensure_venv("kserve")
    port = free_port()
    command = [str(python), str(HERE / "_serve_peers.py"), "kserve", str(model), str(port)]
    server = Server("KServe", [_spawn(command, home / "kserve.log")])
    tcp = Endpoint("KServe 0.21 TCP", f"http://127.0.0.1:{port}")
    server.endpoints = [tcp]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", f"/v2/models/{MODEL}/ready")[0] == 200,
               "KServe model ready")  # fmt: skip
    return server


def start_mlserver(home: Path, model: Path) -> Server:
    python = ensure_venv("mlserver")
    sys.path.insert(0, str(HERE))
    from _serve_peers import write_mlserver_repo

    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    repo = write_mlserver_repo(home / "mlserver", model, ports)
    mlserver = python.parent / "mlserver"
    server = Server("MLServer", [_spawn([str(mlserver), "start", str(repo)],
                                        home / "mlserver.log", cwd=repo)])  # fmt: skip
    tcp = Endpoint("MLServer 1.7 TCP", f"http://127.0.0.1:{ports['http']}")
    server.endpoints = [tcp]
    server.pid = server.procs[0].pid
    wait_until(server, lambda: request(tcp, "GET", f"/v2/models/{MODEL}/ready")[0] == 200,
               "MLServer model ready")  # fmt: skip
    return server


# -- load ---------------------------------------------------------------------------


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


@contextlib.contextmanager
def servers_up(which: set[str], home: Path, model_dir: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        model = model_dir / "model.onnx"
        if "ours" in which or "proxy" in which:
            started.append(start_ours(home / "ours", model_dir, workers=None, tcp=True))
        if "proxy" in which:
            started.append(start_proxy(home / "proxy", started[-1], home / "ours" / "run"))
        if "workers" in which:
            started.append(start_ours(home / "ours-w1", model_dir, workers=1, tcp=False))
        if "workers2" in which:
            started.append(start_ours(home / "ours-w2", model_dir, workers=2, tcp=False))
        if "bare" in which:
            started.append(start_bare(home, model))
        if "mlserver" in which:
            started.append(start_mlserver(home, model))
        if "kserve" in which:
            started.append(start_kserve(home, model))
        yield started
    finally:
        for server in started:
            server.stop()


def profile(server: Server, seconds: float, out: Path, run_load: object) -> None:
    """py-spy record the serving process while ``run_load`` runs (needs root or ptrace)."""
    pyspy = ensure_venv("tools").parent / "py-spy"
    assert server.pid is not None
    spy = subprocess.Popen(
        [str(pyspy), "record", "--pid", str(server.pid), "--duration", str(int(seconds)),
         "--format", "raw", "--output", str(out), "--subprocesses", "--threads", "--rate", "250"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run_load()  # type: ignore[operator]
    spy.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (median)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated connections")
    parser.add_argument("--bodies", default="json,binary", help="json, binary or both")
    parser.add_argument(
        "--only",
        default="ours,workers,bare,mlserver,kserve",
        help="servers to run (comma-separated from: ours, workers, workers2, proxy (starts ours "
        "too), bare, mlserver, kserve)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="instead of the table: py-spy record each of ours' serving processes at c=16 "
        "(JSON and binary) and write collapsed stacks to DIR",
    )
    parser.add_argument("--keep", type=Path, help="keep server folders and logs here")
    parser.add_argument(
        "--driver",
        choices=["autocannon", "perf_analyzer"],
        default="autocannon",
        help="load generator: autocannon against every server, or NVIDIA's perf_analyzer "
        "against ours (HTTP and gRPC on TCP, binary and system shared memory tensors)",
    )
    parser.add_argument(
        "--tensor-mib",
        type=int,
        default=0,
        help="with perf_analyzer: serve a ReduceSum model with an FP32 input of this many MiB "
        "instead of the MLP",
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="nodecache source tree to run ours from, e.g. an export of a commit "
        "(git archive HEAD | tar -x -C DIR); default: this checkout",
    )
    args = parser.parse_args()
    # Stop the servers on SIGTERM or Ctrl-C, even when started in the background (where a
    # shell leaves SIGINT ignored).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    global TREE
    TREE = args.tree.resolve()
    log(f"ours from {TREE}")

    which = set(args.only.split(","))
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = args.bodies.split(",")
    home = args.keep or Path(tempfile.mkdtemp(prefix="nodecache-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if args.driver == "perf_analyzer":
        return drive(args, home, home / "model", start_ours, MODEL)
    cli = ensure_autocannon()
    from nodecache.serve.examples import write_mlp_onnx

    model_dir = home / "model"
    write_mlp_onnx(model_dir / "model.onnx")
    bodies = write_bodies(home)

    with servers_up(which, home, model_dir) as servers:
        endpoints = [e for s in servers for e in s.endpoints]
        for server in servers:
            for endpoint in server.endpoints:
                endpoint.root_pid = server.procs[0].pid
        usable: dict[tuple[str, str], bool] = {}
        for endpoint in endpoints:
            for kind in kinds:
                code, data = probe_infer(endpoint, bodies[kind])
                usable[(endpoint.label, kind)] = code == 200
                if code != 200:
                    log(f"{endpoint.label} answers {code} to a {kind} body: "
                        f"{data[:200]!r}; left out")  # fmt: skip
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for server in servers:
                for kind in kinds:
                    endpoint = server.endpoints[0]
                    if not usable[(endpoint.label, kind)] or server.pid is None:
                        continue
                    out = args.profile / f"{endpoint.label.replace(' ', '_')}-{kind}.txt"
                    log(f"profiling {endpoint.label} {kind} -> {out}")
                    profile(server, args.duration, out, lambda e=endpoint, k=kind: cannon(
                        cli, e, bodies[k], 16, args.duration, 0))  # fmt: skip
            return 0

        # One settling pass over every server first: a freshly started server does
        # start-up work (imports, first calls, background scans) that must not land in the
        # first measured cell.
        for endpoint in endpoints:
            for kind in kinds:
                if usable[(endpoint.label, kind)] and args.warmup > 0:
                    cannon(cli, endpoint, bodies[kind], max(levels), args.warmup, 0)
        cells: dict[tuple[str, str, int], Cell] = {}
        log(f"load average before: {loadavg()}; {args.repeats} x {args.duration:g} s "
            f"(+{args.warmup:g} s warm-up) per cell")  # fmt: skip
        started = time.monotonic()
        for repeat in range(args.repeats):
            for kind in kinds:
                for c in levels:
                    for endpoint in endpoints:
                        if not usable[(endpoint.label, kind)]:
                            continue
                        sample = cannon(cli, endpoint, bodies[kind], c, args.duration, args.warmup)
                        cells.setdefault((endpoint.label, kind, c), Cell()).samples.append(sample)
                        log(f"[{repeat + 1}/{args.repeats}] {endpoint.label:24} {kind:6} c={c:<3}"
                            f" {sample.rps:8.0f} req/s  p50 {sample.p50_ms:6.2f} ms  p99 "
                            f"{sample.p99_ms:6.2f} ms  cpu {sample.cpu_us:5.0f} us/req  "
                            f"non-2xx {sample.non2xx} errors {sample.errors}")  # fmt: skip
        log(f"load average after: {loadavg()}; took {time.monotonic() - started:.0f} s")
        for endpoint in endpoints:
            if endpoint.label.startswith("ours --workers 2"):
                code, data = request(endpoint, "GET", "/nodecache/v1/status")
                model = next(m for m in json.loads(data)["models"] if m["name"] == MODEL)
                log(f"{endpoint.label}: the model on worker {model.get('worker')}, copies "
                    f"{model.get('copies', [])}")  # fmt: skip

    print(f"\n## Serving a [1,64]->[1,10] ONNX MLP: medians of {args.repeats} x "
          f"{args.duration:g} s after {args.warmup:g} s warm-up\n")  # fmt: skip
    rows = []
    for kind in kinds:
        for c in levels:
            for endpoint in endpoints:
                cell = cells.get((endpoint.label, kind, c))
                if cell is None:
                    rows.append([endpoint.label, kind, c, "unsupported", "", "", "", ""])
                    continue
                bad = sum(s.non2xx + s.errors for s in cell.samples)
                rows.append([endpoint.label, kind, c, cell.med("rps"), cell.med("p50_ms"),
                             cell.med("p99_ms"), cell.med("cpu_us"), bad])  # fmt: skip
    headers = ["server", "body", "conc.", "req/s", "p50 ms", "p99 ms", "server CPU µs/req",
               "non-2xx+errors"]  # fmt: skip
    print(table(headers, rows))
    print(f"\nload average at the end: {loadavg()}")
    print_targets(cells, kinds, levels)
    if args.keep is None:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return 0


def print_targets(
    cells: dict[tuple[str, str, int], Cell], kinds: list[str], levels: list[int]
) -> None:
    def get(label: str, kind: str, c: int) -> Cell | None:
        return cells.get((label, kind, c))

    checks: list[tuple[str, str, str]] = []
    c = 16 if 16 in levels else max(levels)
    for kind in kinds:
        peers = [
            p for p in (get("MLServer 1.7 TCP", kind, c), get("KServe 0.21 TCP", kind, c)) if p
        ]
        best = max(peers, key=lambda p: p.med("rps")) if peers else None
        for ours_label in ("ours TCP", "ours UDS"):
            ours = get(ours_label, kind, c)
            if ours is None:
                continue
            if best is not None:
                ratio = ours.med("rps") / best.med("rps")
                checks.append((f"{ours_label} {kind} c={c}: >= 3x the faster peer's req/s",
                               f"{ratio:.2f}x", verdict(ratio >= 3)))  # fmt: skip
                ratio = best.med("cpu_us") / ours.med("cpu_us")
                what = "  (same, by server CPU per request: faster peer / ours)"
                checks.append((what, f"{ratio:.2f}x", verdict(ratio >= 3)))
                ratio = ours.med("p99_ms") / best.med("p99_ms")
                checks.append((f"{ours_label} {kind} c={c}: p99 <= 1/2 the faster peer's p99",
                               f"{ratio:.2f}x", verdict(ratio <= 0.5)))  # fmt: skip
            bare = get("bare aiohttp+ort " + ours_label.split()[-1], kind, c)
            if bare is not None:
                ratio = ours.med("rps") / bare.med("rps")
                what = f"{ours_label} {kind} c={c}: >= 80% of the bare handler (same transport)"
                checks.append((what, f"{ratio:.0%}", verdict(ratio >= 0.8)))
                ratio = bare.med("cpu_us") / ours.med("cpu_us")
                what = "  (same, by server CPU per request: bare / ours)"
                checks.append((what, f"{ratio:.0%}", verdict(ratio >= 0.8)))
        uds, tcp = get("ours UDS", kind, c), get("ours TCP", kind, c)
        if uds and tcp:
            ratio = uds.med("rps") / tcp.med("rps")
            checks.append((f"ours {kind} c={c}: UDS at least as fast as TCP", f"{ratio:.2f}x",
                           verdict(ratio >= 0.98)))  # fmt: skip
        for level in levels:
            direct, routed = get("ours UDS", kind, level), get("ours --workers 1 UDS", kind, level)
            if direct and routed:
                added = routed.med("p50_ms") - direct.med("p50_ms")
                ratio = routed.med("rps") / direct.med("rps")
                cpu = routed.med("cpu_us") - direct.med("cpu_us")
                what = f"routing cost {kind} c={level}: router->worker vs in-process"
                found = f"{ratio:.0%} of the req/s, p50 +{added:.2f} ms, CPU +{cpu:.0f} µs/req"
                checks.append((what, found, "info"))
            proxied = get("proxy TCP", kind, level)
            for direct_label in ("ours UDS", "ours TCP"):
                direct = get(direct_label, kind, level)
                if direct and proxied:
                    added = (proxied.med("p50_ms") - direct.med("p50_ms")) * 1000
                    ratio = proxied.med("rps") / direct.med("rps")
                    cpu = proxied.med("cpu_us") - direct.med("cpu_us")
                    what = f"proxy cost {kind} c={level}: proxy TCP -> UDS vs {direct_label}"
                    found = f"{ratio:.0%} of the req/s, p50 {added:+.0f} µs, CPU {cpu:+.0f} µs/req"
                    checks.append((what, found, verdict(added <= 100) if level == 1 else "info"))
            one, two = routed, get("ours --workers 2 UDS", kind, level)
            if one and two:
                ratio = two.med("rps") / one.med("rps")
                what = f"copies {kind} c={level}: one hot model, --workers 2 vs --workers 1"
                found = (
                    f"{ratio:.2f}x the req/s, p99 {two.med('p99_ms'):.2f} vs "
                    f"{one.med('p99_ms'):.2f} ms"
                )
                checks.append((what, found, "info"))
    if checks:
        print("\n## Targets (issue 6)\n")
        print(table(["target", "measured", "verdict"], checks))


if __name__ == "__main__":
    sys.exit(main())
