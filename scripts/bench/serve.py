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
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _autocannon import Cell, cannon, probe_infer, write_bodies
from _common import ROOT, ensure_autocannon, ensure_venv, loadavg, log, table, verdict
from _perf_analyzer import drive
from _servers import MODEL, Server, request, run_ours_from, servers_up, start_ours


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
    tree = args.tree.resolve()
    run_ours_from(tree)
    log(f"ours from {tree}")

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
