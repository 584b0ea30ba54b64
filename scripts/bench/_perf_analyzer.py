"""perf_analyzer as serve.py's load generator (``--driver perf_analyzer``): Triton's own tool
against ours, over HTTP on TCP (it cannot reach a Unix socket over HTTP) and gRPC, with
tensors in the request (binary tensor data) or in system shared memory.

With ``--tensor-mib N`` the model takes one FP32 input of N MiB per request and answers its
row sums (ONNX ReduceSum): the cost measured is moving the tensor, which shared memory saves.
"""

from __future__ import annotations

import csv
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT, loadavg, log, table

__all__ = ["drive", "write_reduce_onnx"]

INSTALL = ROOT / "scripts" / "bench" / "perf-analyzer-install"
# perf_analyzer's CSV columns (-f) that the table shows; latencies are microseconds.
_COLUMNS = ("Inferences/Second", "p50 latency", "p99 latency", "Server Compute Infer")


def write_reduce_onnx(path: Path, elements: int) -> None:
    """FP32 [-1, elements] -> [-1, 1]: each row's sum (one read of the whole input)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["output"], keepdims=1)],
        "reduce",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", elements])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def ensure_perf_analyzer() -> Path:
    done = subprocess.run([str(INSTALL)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer: {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_once(
    perf_analyzer: Path,
    model: str,
    url: str,
    protocol: str,
    memory: str,
    concurrency: int,
    seconds: float,
    out_shm_bytes: int,
) -> dict[str, float]:
    """One perf_analyzer run at one concurrency: its CSV row, as numbers."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.csv"
        command = [
            str(perf_analyzer), "-m", model, "-i", protocol, "-u", url,
            "--shared-memory", memory, "--output-shared-memory-size", str(out_shm_bytes),
            "--concurrency-range", str(concurrency),
            "--measurement-interval", str(round(seconds * 1000)),
            # Three windows, averaged, whatever their spread: the machine is shared.
            "--max-trials", "3", "--stability-percentage", "999",
            "-f", str(report),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 10 + 120)
        if done.returncode != 0:
            raise RuntimeError(f"perf_analyzer {protocol}/{memory}: {done.stdout[-2000:]}")
        with report.open() as f:
            row = next(csv.DictReader(f))
    return {key: float(value) for key, value in row.items() if value not in ("", None)}


def drive(
    args: Any,
    home: Path,
    model_dir: Path,
    start: Callable[..., Any],
    model: str,
) -> int:
    """Start ours (in-process, HTTP and gRPC on loopback TCP) and measure it with
    perf_analyzer for each protocol, memory kind and concurrency; print one table."""
    perf_analyzer = ensure_perf_analyzer()
    elements = args.tensor_mib * (1 << 20) // 4
    if elements:
        write_reduce_onnx(model_dir / "model.onnx", elements)
        shape = f"FP32 [1,{elements}] ({args.tensor_mib} MiB) -> [1,1] (ReduceSum)"
    else:
        from nodecache.serve.examples import write_mlp_onnx

        write_mlp_onnx(model_dir / "model.onnx")
        shape = "FP32 [1,64] -> [1,10] (MLP)"
    server = start(home / "ours", model_dir, workers=None, tcp=True, grpc=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    cells: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    try:
        urls = {"http": server.endpoints[1].url, "grpc": server.grpc_url}
        log(f"load average before: {loadavg()}; {args.repeats} x {args.duration:g} s per cell")
        for repeat in range(args.repeats):
            for protocol in ("http", "grpc"):
                for memory in ("none", "system"):
                    for c in levels:
                        url = urls[protocol].removeprefix("http://")
                        row = run_once(perf_analyzer, model, url, protocol, memory, c,
                                       args.duration, 1 << 20)  # fmt: skip
                        cells.setdefault((protocol, memory, c), []).append(row)
                        log(f"[{repeat + 1}/{args.repeats}] {protocol:4} {memory:6} c={c:<3} "
                            f"{row['Inferences/Second']:8.1f} infer/s  p50 "
                            f"{row['p50 latency'] / 1000:7.2f} ms")  # fmt: skip
    finally:
        server.stop()
    print(f"\n## perf_analyzer against ours: {shape}; medians of {args.repeats} x "
          f"{args.duration:g} s (3 windows each)\n")  # fmt: skip
    rows = []
    for (protocol, memory, c), samples in cells.items():
        medians = [sorted(s[k] for s in samples)[len(samples) // 2] for k in _COLUMNS]
        rows.append([protocol, "binary" if memory == "none" else "system shm", c,
                     f"{medians[0]:.1f}", f"{medians[1] / 1000:.2f}", f"{medians[2] / 1000:.2f}",
                     f"{medians[3] / 1000:.2f}"])  # fmt: skip
    print(table(["protocol", "tensors", "conc.", "infer/s", "p50 ms", "p99 ms",
                 "server compute ms"], rows))  # fmt: skip
    for protocol in ("http", "grpc"):
        for c in levels:
            binary, shared = cells.get((protocol, "none", c)), cells.get((protocol, "system", c))
            if binary and shared:
                ratio = _median(shared, "Inferences/Second") / _median(binary, "Inferences/Second")
                print(f"{protocol} c={c}: system shared memory {ratio:.2f}x the binary "
                      "extension's throughput")  # fmt: skip
    print(f"\nload average at the end: {loadavg()}")
    return 0


def _median(samples: list[dict[str, float]], key: str) -> float:
    return sorted(s[key] for s in samples)[len(samples) // 2]
