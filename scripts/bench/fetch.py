#!/usr/bin/env python3
"""Benchmark: fetching models — nodecache prefetch vs s5cmd and KServe's initializer (S3),
``oras pull`` (OCI) and ``huggingface_hub.snapshot_download`` (Hugging Face).

``--source s3`` (the default): one local SeaweedFS S3 server (``weed mini`` from the
project venv), the same objects for every tool: one large object (2 GiB) and a model folder
of 200 files (1 GiB: 8 shards of 64 MiB and 192 files of about 2.7 MiB). Each tool runs as
a child process into an empty folder, with the page cache dropped before every run (``sync;
echo 3 > /proc/sys/vm/drop_caches``, needs root; skipped with a warning otherwise). Tools
take turns run by run so drift in the machine's load hits them alike. Reported per tool and
data set: median wall time, MiB/s, and CPU-seconds per GiB (user+system of the child and
everything it waited for, from ``getrusage(RUSAGE_CHILDREN)``), plus the server's CPU over
the same run, and the ratios the issue asks for.

    .venv/bin/python scripts/bench/fetch.py            # full: 2 GiB + 200 files/1 GiB, 3 runs
    .venv/bin/python scripts/bench/fetch.py --quick    # 256 MiB + 50 files/128 MiB, 1 run
    .venv/bin/python scripts/bench/fetch.py --source oci   # vs oras pull, Debian's registry
    .venv/bin/python scripts/bench/fetch.py --source hf    # vs snapshot_download, fake Hub

``--source oci`` and ``--source hf`` serve the same data sets from the tests' registry and
fake Hub (``_fetch_peers.py``). ``--tree DIR`` runs ours from a clean export of a commit
(``git archive HEAD | tar -x -C DIR``) instead of this checkout, which others may be
editing; ``--alt-tree DIR`` adds the tool ``ours-alt``, ours from a second tree (a
candidate change), measured side by side with the first.

KServe's storage initializer (``kserve-storage==0.21.0``) lives in its own venv under
``.bench/venv-kserve-storage`` (created on first use): it drags in cloud SDKs and downgrades gcsfs.
Results also go to ``.bench/fetch/results-SOURCE.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ensure_venv, loadavg, log, median, table
from _fetch_peers import HfServer, OciServer, Weed, describe_peer

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / ".bench" / "fetch"
VENV_BIN = ROOT / ".venv" / "bin"
MiB, GiB = 1 << 20, 1 << 30
TOOLS = {
    "s3": ("ours", "s5cmd", "kserve", "ours-lite", "ours-nohash", "s5cmd-fsync", "ours-alt"),
    "oci": ("ours", "oras", "ours-alt"),
    "hf": ("ours", "hf", "ours-alt"),
}
DEFAULT_TOOLS = {"s3": "ours,s5cmd,kserve", "oci": "ours,oras", "hf": "ours,hf"}
# s5cmd-fsync: s5cmd, then an fsync of every file it wrote (coreutils ``sync FILE...``): the
# durability ours pays for before it publishes (s5cmd itself leaves the bytes dirty).
# ours-lite: the same store without fsync and MD5 checks, to show what durability and
# verification cost (sha256 of every file is always computed).
OURS_LITE_SNIPPET = (
    "import asyncio, sys\n"
    "from nodecache.cache import FetchOptions, ModelStore\n"
    "store = ModelStore(sys.argv[2], options=FetchOptions(fsync=False, verify_md5=False))\n"
    "print(asyncio.run(store.fetch(sys.argv[1])).path)\n"
)
# ours-nohash (a diagnostic, not a mode of the product): ours-lite with the sha256 fed nothing,
# i.e. the transfer alone (list, ranged reads, pwrite, writeback), to set beside s5cmd, which
# hashes nothing either. The manifest it writes holds dummy digests.
OURS_NOHASH_SNIPPET = (
    "import asyncio, sys\n"
    "import nodecache.cache.fetch as fetch\n"
    "from nodecache.cache import FetchOptions, ModelStore\n"
    "class NoHash:\n"
    "    def update(self, data): pass\n"
    "    def hexdigest(self): return '0' * 64\n"
    "plan = fetch.Transfer._plan\n"
    "def _plan(self, remote):\n"
    "    job = plan(self, remote)\n"
    "    job.sha256 = NoHash()\n"
    "    return job\n"
    "fetch.Transfer._plan = _plan\n"
    "store = ModelStore(sys.argv[2], options=FetchOptions(fsync=False, verify_md5=False))\n"
    "print(asyncio.run(store.fetch(sys.argv[1])).path)\n"
)
KSERVE_SNIPPET = (
    "import sys\nfrom kserve_storage import Storage\nStorage.download(sys.argv[1], sys.argv[2])\n"
)


@dataclass
class Run:
    tool: str
    dataset: str
    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float
    nbytes: int
    load: str


@dataclass
class Dataset:
    name: str
    uri_key: str
    """Key (object) or prefix (folder, ending in /) in the bucket."""
    files: dict[str, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(self.files.values())

    @property
    def is_folder(self) -> bool:
        return self.uri_key.endswith("/")


# ---- data ---------------------------------------------------------------------------------


def make_datasets(big: int, files: int, folder_bytes: int) -> list[Dataset]:
    """The large object, and a folder of ``files`` files: 4% big shards, the rest small."""
    single = Dataset("1 object", "big/model.bin", {"model.bin": big})
    shards = max(1, files // 25)
    shard_bytes = folder_bytes // 2 // shards
    small = files - shards
    small_bytes = (folder_bytes - shard_bytes * shards) // max(small, 1)
    folder = Dataset(f"{files} files", "folder/")
    for i in range(shards):
        folder.files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = shard_bytes
    for i in range(small):
        # Odd sizes around the mean, so no two files are alike and none is part-aligned.
        size = small_bytes + ((i * 7919) % 4097) - 2048 if small_bytes > 4096 else small_bytes
        folder.files[f"layers/{i // 50:02d}/tensor-{i:04d}.bin"] = size
    return [single, folder]


# ---- measuring ----------------------------------------------------------------------------


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def command(tool: str, ds: Dataset, server: Any, dest: Path, kserve: Path | None) -> list[str]:
    uri = server.uri(ds)
    if tool in ("ours", "ours-alt") or tool.startswith("ours:"):  # ours:--concurrency=16+...
        extra = [a for a in tool.partition(":")[2].split("+") if a]
        return [
            str(VENV_BIN / "python"), "-m", "nodecache.agent.prefetch", uri,
            "--cache-dir", str(dest), "--progress", "none", "--log-level", "warning", *extra,
        ]  # fmt: skip
    if tool in ("oras", "hf"):
        return server.peer(ds, dest, str(VENV_BIN / "python"))
    if tool == "ours-lite":
        return [str(VENV_BIN / "python"), "-c", OURS_LITE_SNIPPET, uri, str(dest)]
    if tool == "ours-nohash":
        return [str(VENV_BIN / "python"), "-c", OURS_NOHASH_SNIPPET, uri, str(dest)]
    if tool in ("s5cmd", "s5cmd-fsync"):
        src = f"{uri}*" if ds.is_folder else uri
        copy = [*server.s5cmd(), "cp", src, f"{dest}/"]
        if tool == "s5cmd":
            return copy
        script = '"$@" && find "$0" -type f -exec sync {} +'
        return ["sh", "-c", script, str(dest), *copy]
    if tool == "kserve":
        assert kserve is not None
        return [str(kserve), "-c", KSERVE_SNIPPET, uri, str(dest)]
    raise ValueError(tool)


def measure(
    tool: str, ds: Dataset, server: Any, dest: Path, kserve: Path | None, trees: dict[str, Path]
) -> Run:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cmd = command(tool, ds, server, dest, kserve)
    env = server.env()
    tree = trees.get("ours-alt" if tool == "ours-alt" else "ours")
    if tree is not None and tool.startswith("ours"):
        env["PYTHONPATH"] = str(tree)
    load = loadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    server_cpu = server.cpu_seconds() - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed on {ds.name} ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    got = tree_bytes(dest, skip=(".nodecache-", ".cache"))
    if got != ds.nbytes:
        raise SystemExit(f"{tool} wrote {got} bytes for {ds.name}, expected {ds.nbytes}")
    if tool.startswith("ours"):
        folder = Path(done.stdout.strip().splitlines()[-1])
        if not folder.is_dir():
            raise SystemExit(f"ours printed {folder}, which is not a folder")
    shutil.rmtree(dest, ignore_errors=True)
    return Run(tool, ds.name, seconds, cpu, server_cpu, ds.nbytes, load)


def tree_bytes(folder: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under ``folder``, leaving out names (files and folders) starting
    with ``skip``: ours' manifest, snapshot_download's ``.cache/huggingface``."""
    total = 0
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(skip)]
        for name in files:
            if not name.startswith(skip):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def startup_seconds(tree: Path | None) -> tuple[float, float]:
    """How long ``python -m nodecache.agent.prefetch --help`` takes, and its CPU-seconds:
    the interpreter and imports (medians of 3)."""
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree is not None else None
    times, cpus = [], []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(
            [str(VENV_BIN / "python"), "-m", "nodecache.agent.prefetch", "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            check=True,
        )
        times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return median(times), median(cpus)


def package_path(tree: Path, home: Path) -> Path:
    """A folder to put on PYTHONPATH so ``nodecache.*`` imports from the source ``tree``
    (its agent/, cache/ and serve/, as the editable install maps them for this checkout)."""
    tree = tree.resolve()
    if not (tree / "cache" / "__init__.py").is_file():
        raise SystemExit(f"{tree} is not a nodecache source tree (no cache/__init__.py)")
    shim = home / "trees" / hashlib.sha256(str(tree).encode()).hexdigest()[:12]
    (shim / "nodecache").mkdir(parents=True, exist_ok=True)
    for part in ("agent", "cache", "serve"):
        link = shim / "nodecache" / part
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(tree / part)
    return shim


# ---- report -------------------------------------------------------------------------------


def summarize(runs: list[Run], datasets: list[Dataset], tools: list[str]) -> str:
    rows = []
    stats: dict[tuple[str, str], dict[str, float]] = {}
    for ds in datasets:
        for tool in tools:
            mine = [r for r in runs if r.tool == tool and r.dataset == ds.name]
            if not mine:
                continue
            secs = median([r.seconds for r in mine])
            gib = ds.nbytes / GiB
            s = {
                "seconds": secs,
                "mib_s": ds.nbytes / MiB / secs,
                "cpu_per_gib": median([r.cpu_seconds for r in mine]) / gib,
                "server_cpu_per_gib": median([r.server_cpu_seconds for r in mine]) / gib,
            }
            stats[(tool, ds.name)] = s
            spread = f"{min(r.seconds for r in mine):.2f}-{max(r.seconds for r in mine):.2f}"
            rows.append(
                (ds.name, tool, len(mine), secs, spread, s["mib_s"], s["cpu_per_gib"],
                 s["server_cpu_per_gib"])
            )  # fmt: skip
    headers = ("data", "tool", "runs", "median s", "range s", "MiB/s", "CPU-s/GiB",
               "server CPU-s/GiB")  # fmt: skip
    out = [table(headers, rows)]
    ratio_rows = []
    for ds in datasets:
        for mine in ("ours", "ours-alt", "ours-nohash"):
            ours = stats.get((mine, ds.name))
            if ours is None:
                continue
            for peer in tools:
                other = stats.get((peer, ds.name))
                if peer.startswith("ours") or other is None:
                    continue
                ratio_rows.append(
                    (ds.name, f"{mine} / {peer}", ours["mib_s"] / other["mib_s"],
                     ours["cpu_per_gib"] / other["cpu_per_gib"])
                )  # fmt: skip
    if ratio_rows:
        out.append(table(("data", "ratio", "throughput", "CPU per GiB"), ratio_rows))
    return "\n\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--source", choices=tuple(TOOLS), default="s3", help="default: s3")
    parser.add_argument("--quick", action="store_true", help="256 MiB + 50 files/128 MiB, 1 run")
    parser.add_argument("--runs", type=int, help="runs per tool and data set (default 3)")
    parser.add_argument("--big", type=float, help="size of the one object, MiB (default 2048)")
    parser.add_argument("--files", type=int, help="files in the folder (default 200)")
    parser.add_argument("--folder", type=float, help="folder total, MiB (default 1024)")
    parser.add_argument(
        "--tools",
        help="comma-separated; s3: " + ", ".join(TOOLS["s3"]) + "; oci: "
        + ", ".join(TOOLS["oci"]) + "; hf: " + ", ".join(TOOLS["hf"]) + "; ours:ARG+ARG... "
        "runs ours with extra options, e.g. ours:--concurrency=16 (default: "
        + "; ".join(f"{k}: {v}" for k, v in DEFAULT_TOOLS.items()) + ")",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=HOME, help="scratch folder (on disk)")
    parser.add_argument(
        "--checksum",
        choices=("CRC64NVME", "CRC32C"),
        help="s3: upload with this S3 additional checksum (botocore), which ours verifies by",
    )
    parser.add_argument("--tree", type=Path, help="run ours from this source tree")
    parser.add_argument("--alt-tree", type=Path, help="run ours-alt from this source tree")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    big = int((args.big or (256 if args.quick else 2048)) * MiB)
    files = args.files or (50 if args.quick else 200)
    folder = int((args.folder or (128 if args.quick else 1024)) * MiB)
    tools = [t for t in (args.tools or DEFAULT_TOOLS[args.source]).split(",") if t]
    if unknown := {t for t in tools if not t.startswith("ours:")} - set(TOOLS[args.source]):
        parser.error(f"unknown tools for --source {args.source}: {', '.join(sorted(unknown))}")
    if "ours-alt" in tools and args.alt_tree is None:
        parser.error("ours-alt needs --alt-tree")
    if args.checksum and args.source != "s3":
        parser.error("--checksum is for --source s3")

    trees = {}
    if args.tree is not None:
        trees["ours"] = package_path(args.tree, HOME)
    if args.alt_tree is not None:
        trees["ours-alt"] = package_path(args.alt_tree, HOME)
    kserve = ensure_venv("kserve-storage") if "kserve" in tools else None
    datasets = make_datasets(big, files, folder)
    work: Path = args.work
    server: Any
    if args.source == "oci":
        server = OciServer(work / "registry")
    elif args.source == "hf":
        server = HfServer()
    else:
        server = Weed(work / "weed")
    results: list[Run] = []
    try:
        log(f"starting the {args.source} server")
        server.start()
        log(f"seeding {', '.join(ds.name for ds in datasets)}")
        if args.source == "s3":
            server.seed_s3(datasets, work / "staging", args.checksum or "")
        else:
            server.seed(datasets)
        startup = {
            tool: startup_seconds(trees.get(tool)) for tool in ("ours", "ours-alt") if tool in tools
        }
        cold = drop_caches()
        if not cold:
            log("WARNING: cannot drop the page cache (not root?); runs are warm")
        for ds in datasets:
            for i in range(runs):
                for tool in tools:
                    drop_caches()
                    run = measure(tool, ds, server, work / "dest", kserve, trees)
                    results.append(run)
                    log(
                        f"{ds.name} run {i + 1}/{runs} {tool}: {run.seconds:.2f}s "
                        f"{run.nbytes / MiB / run.seconds:.0f} MiB/s cpu {run.cpu_seconds:.2f}s "
                        f"server cpu {run.server_cpu_seconds:.2f}s load {run.load}"
                    )
    finally:
        server.stop()
        for scratch in ("weed", "registry", "dest"):  # GiBs of objects, re-seeded each time
            shutil.rmtree(work / scratch, ignore_errors=True)
    report = summarize(results, datasets, tools)
    started = "; ".join(
        f"{tool}'s process start (interpreter + imports) {wall:.2f}s, {cpu:.2f} CPU-s"
        for tool, (wall, cpu) in startup.items()
    )
    each = [float(r.load.split()[0]) for r in results]
    loads = f"{min(each):.1f}-{max(each):.1f}" if each else "n/a"
    header = (
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"source {args.source}{' ' + args.checksum if args.checksum else ''}, "
        f"page cache {'dropped' if cold else 'NOT dropped'} before each run, "
        f"load average now {loadavg()} (1-minute, over the runs: {loads}); "
        f"{started or 'ours not run'}, included in its times"
    )
    if peer := describe_peer(args.source):
        header += f"; {peer}"
    for tool, tree in trees.items():
        header += f"; {tool} from {tree}"
    print(header)
    print()
    print(report)
    HOME.mkdir(parents=True, exist_ok=True)
    (HOME / f"results-{args.source}.json").write_text(
        json.dumps(
            {
                "header": header,
                "datasets": [asdict(d) | {"nbytes": d.nbytes} for d in datasets],
                "runs": [asdict(r) for r in results],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
