#!/usr/bin/env python3
"""Model load benchmark (issue 4): time to *ready*, ours vs the loaders people use.

"Ready" = the model has answered its first request, so every weight page has been
touched (an mmap returns in microseconds and pays on first use). Each trial runs in a
fresh process; imports happen before the clock for every method alike. Cold trials drop
the page cache first (``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root); warm
trials read the files into the page cache first.

    .venv/bin/python scripts/bench/load.py            # medians of 3, cold and warm
    .venv/bin/python scripts/bench/load.py --runs 1 --only warm

Models (made once under .bench/load-data): a 1 GiB safetensors torch MLP (module class +
weights, served by ours through the torch runtime) with the same weights as a torch.save
checkpoint; a ~200 MB ONNX MLP, once with inline initializers and once with external data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_HOME, ROOT, ensure_venv, loadavg, log, median, table, verdict

from nodecache.cache import DERIVED_DIR

TRIAL = Path(__file__).resolve().parent / "_load_trial.py"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"

TORCH_LAYERS, TORCH_WIDTH = 16, 4096  # 16 x (4096x4096 + 4096) fp32 = 1.0 GiB
ONNX_LAYERS, ONNX_WIDTH = 12, 2048  # 12 x 2048x2048 fp32 = 201 MB

MODEL_PY = f"""\
import torch


class Net(torch.nn.Module):
    width = {TORCH_WIDTH}

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear({TORCH_WIDTH}, {TORCH_WIDTH}) for _ in range({TORCH_LAYERS})
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x
"""


# -- model files ----------------------------------------------------------------------


def make_models(data: Path) -> None:
    """Write the benchmark models once (a few seconds; ~2.4 GB of disk)."""
    torch_dir, pt_dir = data / "torch-safetensors", data / "torch-pt"
    inline_dir, external_dir = data / "onnx-inline", data / "onnx-external"
    if not (torch_dir / "model.safetensors").exists() or not (pt_dir / "model.pt").exists():
        log("writing the 1 GiB torch model (safetensors + torch.save)")
        code = f"""
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
torch.manual_seed(0)
sys.path.insert(0, {str(torch_dir)!r})
Path({str(torch_dir)!r}).mkdir(parents=True, exist_ok=True)
Path({str(torch_dir)!r}, "model.py").write_text({MODEL_PY!r})
from model import Net
state = {{k: (v * 0.01).contiguous() for k, v in Net().state_dict().items()}}
Path({str(pt_dir)!r}).mkdir(parents=True, exist_ok=True)
torch.save(state, Path({str(pt_dir)!r}, "model.pt"))
save_file(state, Path({str(torch_dir)!r}, "model.safetensors"))
"""
        subprocess.run([str(PROJECT_PY), "-c", code], check=True)
        (torch_dir / "bench.json").write_text(json.dumps({"width": TORCH_WIDTH}))
    if not (inline_dir / "model.onnx").exists() or not (external_dir / "model.onnx").exists():
        log("writing the 200 MB ONNX model (inline and external data)")
        code = f"""
import numpy as np, onnx
from pathlib import Path
from onnx import TensorProto, helper, numpy_helper
rng = np.random.default_rng(0)
nodes, inits, prev = [], [], "input"
for i in range({ONNX_LAYERS}):
    w = (rng.standard_normal(({ONNX_WIDTH}, {ONNX_WIDTH}), dtype=np.float32) * 0.02)
    inits.append(numpy_helper.from_array(w, f"w{{i}}"))
    nodes.append(helper.make_node("MatMul", [prev, f"w{{i}}"], [f"m{{i}}"]))
    out = "output" if i == {ONNX_LAYERS} - 1 else f"r{{i}}"
    nodes.append(helper.make_node("Relu", [f"m{{i}}"], [out]))
    prev = out
graph = helper.make_graph(
    nodes, "big_mlp",
    [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", {ONNX_WIDTH}])],
    [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", {ONNX_WIDTH}])],
    initializer=inits,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
for d in ({str(inline_dir)!r}, {str(external_dir)!r}):
    Path(d).mkdir(parents=True, exist_ok=True)
onnx.save_model(model, {str(inline_dir / "model.onnx")!r})
onnx.save_model(model, {str(external_dir / "model.onnx")!r}, save_as_external_data=True,
                all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
"""
        subprocess.run([str(PROJECT_PY), "-c", code], check=True)
    (data / "onnx-meta.json").write_text(json.dumps({"width": ONNX_WIDTH}))


def files_of(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_file())


def derived_files(model_dir: Path) -> list[Path]:
    """The mapped copy ours builds beside an inline ONNX model on its first load."""
    return sorted(p for p in (model_dir / DERIVED_DIR).rglob("*") if p.is_file())


def size_of(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


# -- page cache ---------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(
            f"cold runs need root to drop the page cache ({exc}); use --only warm"
        ) from None


def warm_up(paths: list[Path]) -> None:
    """Read the files into the page cache, from disk, every time.

    Evicted first so every warm trial finds the same page cache: how the kernel maps pages
    depends on how they got there. Pages a read brought in sit in large folios, mapped
    ~16 pages per fault or more (~6 ms per GiB here); pages left by small writes (the
    writer of the file, our own fetcher's 256 KiB writes) map one 4 KiB page per fault
    (19-36 ms per GiB). See docs/BENCHMARKS.md, "Attach"."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        with path.open("rb") as f:
            while f.read(16 << 20):
                pass


# -- trials -------------------------------------------------------------------------


@dataclass
class Result:
    api_s: float
    ready_s: float
    infer_s: float


def run_trial(python: Path, method: str, model_dir: Path, files: list[Path], cold: bool) -> Result:
    proc = subprocess.Popen(
        [str(python), str(TRIAL), method, str(model_dir), "--wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "imported":
            raise RuntimeError(f"{method} trial failed to start")
        drop_caches() if cold else warm_up(files)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if proc.wait(120) != 0 or not line:
            raise RuntimeError(f"{method} trial exited {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    doc = json.loads(line)
    return Result(doc["api_s"], doc["ready_s"], doc["infer_s"])


def run_dd(files: list[Path], cold: bool) -> Result:
    drop_caches() if cold else warm_up(files)
    started = time.perf_counter()
    for path in files:
        subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=16M"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    took = time.perf_counter() - started
    return Result(took, took, 0.0)


def memcpy_rate(nbytes: int = 1 << 30) -> float:
    """Bytes/s of one large copy in this process (numpy), for reference."""
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    took = []
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(dst, src)
        took.append(time.perf_counter() - started)
    return nbytes / min(took)


@dataclass
class Row:
    label: str
    mode: str
    nbytes: int
    results: list[Result]

    def med(self, attr: str) -> float:
        return median([getattr(r, attr) for r in self.results])

    @property
    def ready_s(self) -> float:
        return self.med("ready_s")

    @property
    def load_s(self) -> float:
        """Ready minus a steady-state answer: what loading cost on top of computing."""
        return max(0.0, self.ready_s - self.med("infer_s"))

    def cells(self) -> list[object]:
        gb = self.nbytes / 1e9
        api, ready = self.med("api_s"), self.ready_s
        infer = self.med("infer_s")
        return [
            self.label,
            self.mode,
            api * 1e3,
            ready * 1e3,
            infer * 1e3 if infer else float("nan"),
            self.load_s * 1e3,
            gb / api if api else float("nan"),
            gb / ready,
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="trials per cell (median)")
    parser.add_argument("--only", choices=("cold", "warm"), help="only one page-cache state")
    parser.add_argument("--skip-runai", action="store_true", help="no Run:ai streamer venv")
    parser.add_argument("--data-dir", type=Path, default=BENCH_HOME / "load-data")
    parser.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="nodecache source tree to load ours from, e.g. an export of a commit "
        "(git archive HEAD | tar -x -C DIR); default: this checkout",
    )
    args = parser.parse_args()
    os.environ["NODECACHE_TREE"] = str(args.tree.resolve())
    log(f"ours from {args.tree.resolve()}")

    runai_py = None if args.skip_runai else ensure_venv("runai")
    data = args.data_dir
    make_models(data)
    st_dir, pt_dir = data / "torch-safetensors", data / "torch-pt"
    inline_dir, ext_dir = data / "onnx-inline", data / "onnx-external"
    st_files = [st_dir / "model.safetensors"]
    pt_files = [pt_dir / "model.pt"]
    torch_bytes = size_of(st_files)
    modes = [args.only] if args.only else ["cold", "warm"]
    log(f"load average before: {loadavg()}; {args.runs} run(s) per cell; modes {modes}")

    # (label, python, method, model dir, files read)
    torch_cases: list[tuple[str, Path, str, Path, list[Path]]] = [
        ("dd (disk/page-cache ceiling)", PROJECT_PY, "dd", st_dir, st_files),
        ("ours (torch runtime, safetensors)", PROJECT_PY, "ours_torch", st_dir, st_files),
        ("safetensors.torch.load_file", PROJECT_PY, "safetensors", st_dir, st_files),
        ("torch.load(weights_only=True)", PROJECT_PY, "torch_load", st_dir, pt_files),
        ("torch.load(weights_only, mmap=True)", PROJECT_PY, "torch_load_mmap", st_dir, pt_files),
    ]
    if runai_py is not None:
        torch_cases.append(("runai-model-streamer", runai_py, "runai", st_dir, st_files))
    # Ours converts a large inline model once, on its first load, into a mapped copy with
    # external data; every later load (after an eviction, in another worker, after a
    # restart) uses the copy. Time that first load once, then the usual trials.
    for folder in (inline_dir, ext_dir):
        shutil.rmtree(folder / DERIVED_DIR, ignore_errors=True)
    first = run_trial(PROJECT_PY, "ours_onnx", inline_dir, files_of(inline_dir), False)
    first_label = "ours, inline, first load (builds copy)"
    rows_first = Row(first_label, "warm", size_of(files_of(inline_dir)), [first])
    log(f"warm {first_label:40} ready {first.ready_s * 1e3:8.1f} ms")
    inline_ours = files_of(inline_dir) + derived_files(inline_dir)
    onnx_cases: list[tuple[str, Path, str, Path, list[Path]]] = [
        ("dd inline .onnx", PROJECT_PY, "dd", inline_dir, files_of(inline_dir)),
        ("ours, inline .onnx", PROJECT_PY, "ours_onnx", inline_dir, inline_ours),
        ("ours, external data", PROJECT_PY, "ours_onnx", ext_dir, files_of(ext_dir)),
        ("ort default, inline", PROJECT_PY, "ort", inline_dir, files_of(inline_dir)),
        ("ort default, external data", PROJECT_PY, "ort", ext_dir, files_of(ext_dir)),
        ("ort no-prepack, inline", PROJECT_PY, "ort_noprepack", inline_dir, files_of(inline_dir)),
        ("ort no-prepack, external", PROJECT_PY, "ort_noprepack", ext_dir, files_of(ext_dir)),
    ]
    # A second worker process takes an extra copy of a model warm in the first (the
    # pool's own path); only meaningful warm.
    attach_cases: list[tuple[str, Path, str, Path, list[Path]]] = [
        ("attach: 2nd worker, 1 GiB torch", PROJECT_PY, "attach_torch", st_dir, st_files),
        ("attach: 2nd worker, 201 MB ONNX", PROJECT_PY, "attach_onnx", inline_dir, inline_ours),
    ]

    rows: dict[tuple[str, str], Row] = {(first_label, "warm"): rows_first}
    for mode in modes:
        cold = mode == "cold"
        extra = attach_cases if mode == "warm" else []
        for label, python, method, model_dir, files in torch_cases + onnx_cases + extra:
            results = []
            for _ in range(args.runs):
                if method == "dd":
                    results.append(run_dd(files, cold))
                else:
                    results.append(run_trial(python, method, model_dir, files, cold))
            row = Row(label, mode, size_of(files), results)
            rows[(label, mode)] = row
            log(f"{mode:4} {label:40} ready {row.ready_s * 1e3:8.1f} ms")
    log(f"load average after: {loadavg()}")

    headers = ["method", "cache", "API ms", "ready ms", "steady infer ms", "load ms",
               "GB/s at API", "GB/s at ready"]  # fmt: skip
    torch_labels = [c[0] for c in torch_cases]
    onnx_labels = [c[0] for c in onnx_cases]
    print(f"\n## 1 GiB safetensors torch model ({torch_bytes / 2**30:.2f} GiB), medians of "
          f"{args.runs}\n")  # fmt: skip
    print(table(headers, [rows[(lbl, m)].cells() for m in modes for lbl in torch_labels]))
    onnx_bytes = size_of(files_of(inline_dir))
    print(f"\n## ONNX model ({onnx_bytes / 1e6:.0f} MB), medians of {args.runs}\n")
    onnx_rows = [rows[(lbl, m)].cells() for m in modes for lbl in onnx_labels]
    print(table(headers, [rows_first.cells(), *onnx_rows]))
    if "warm" in modes:
        print("\n## A second worker attaching a model warm in the first (warm cache)\n")
        print(table(headers, [rows[(c[0], "warm")].cells() for c in attach_cases]))
    print(f"\nmemcpy (numpy, 1 GiB): {memcpy_rate() / 1e9:.1f} GB/s; load average {loadavg()}")
    print("'load ms' = ready - one steady-state answer: the cost of loading on top of computing.")

    print("\n## Targets (issue 4)\n")
    checks: list[tuple[str, str, bool]] = []
    if "cold" in modes:
        ours, dd = rows[(torch_labels[1], "cold")], rows[(torch_labels[0], "cold")]
        ratio = dd.ready_s / ours.ready_s
        checks.append(("cold ready >= 90% of the disk ceiling (dd)", f"{ratio:.0%}", ratio >= 0.9))
    if "warm" in modes:
        ours, st = rows[(torch_labels[1], "warm")], rows[(torch_labels[2], "warm")]
        tl = rows[(torch_labels[3], "warm")]
        ratio = st.ready_s / ours.ready_s
        checks.append(("warm ready >= 90% of safetensors zero-copy", f"{ratio:.0%}", ratio >= 0.9))
        ratio = tl.ready_s / ours.ready_s
        checks.append(("warm ready >= 10x torch.load", f"{ratio:.1f}x", ratio >= 10))
        ratio = tl.load_s / max(ours.load_s, 1e-6)
        checks.append(("  (same, load cost only: ready - steady infer)", f"{ratio:.1f}x",
                       ratio >= 10))  # fmt: skip
        base = rows[("ort default, inline", "warm")]
        for label in ("ours, inline .onnx", "ours, external data"):
            frac = rows[(label, "warm")].ready_s / base.ready_s
            checks.append((f"ONNX {label} ready <= 5% of default inline ort", f"{frac:.1%}",
                           frac <= 0.05))  # fmt: skip
            frac = rows[(label, "warm")].load_s / base.load_s
            checks.append(("  (same, load cost only: ready - steady infer)", f"{frac:.1%}",
                           frac <= 0.05))  # fmt: skip
        best = rows[("ort no-prepack, external", "warm")]
        frac = best.load_s / base.load_s
        checks.append(("  reference: plain ort, external data + disable_prepacking, load cost",
                       f"{frac:.1%}", frac <= 0.05))  # fmt: skip
        for label, *_ in attach_cases:
            attach = rows[(label, "warm")].load_s
            checks.append((f"{label} <= 10 ms (load cost)", f"{attach * 1e3:.0f} ms",
                           attach <= 0.010))  # fmt: skip
    print(table(["target", "measured", "verdict"], [(t, m, verdict(ok)) for t, m, ok in checks]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
