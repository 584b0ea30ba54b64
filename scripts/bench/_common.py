"""Shared pieces of the benchmarks: self-installing peer environments, stats, tables.

Peers with heavy or conflicting dependencies (MLServer pins uvloop, KServe drags in half
of the cloud SDKs, the Run:ai streamer ships native code) live in their own virtual
environments under ``.bench/`` (gitignored), created on first use and re-created only
when their requirement list changes. Nothing here touches the project's ``.venv``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_HOME = ROOT / ".bench"

# name -> pip requirements. Versions are pinned so numbers stay comparable over time.
VENVS: dict[str, list[str]] = {
    "mlserver": ["mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime==1.31.1", "numpy"],
    "kserve": ["kserve==0.21.0", "onnxruntime==1.31.1", "numpy"],
    # KServe's storage initializer (fetch.py); its own venv: it downgrades gcsfs.
    "kserve-storage": ["kserve-storage==0.21.0"],
    "runai": ["runai-model-streamer==0.17.0", "torch==2.13.0", "numpy", "safetensors"],
    "tools": ["py-spy==0.4.3"],  # profiling ours (serve.py --profile)
}
AUTOCANNON = "autocannon@8.0.0"


def launch_seaweedfs(
    weed: Path, root: Path, *, bucket: str, access_key: str, secret_key: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``weed mini`` on loopback with one bucket and one identity, started exactly as the
    tests start it (``tests/support.py``, one helper for both): (process, S3 endpoint)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from support import launch_seaweedfs as launch
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return launch(weed, root, bucket=bucket, access_key=access_key, secret_key=secret_key)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _python_for_venvs() -> str:
    # The interpreter the project venv was made from, so peers run on the same Python.
    return os.environ.get("PYTHON") or shutil.which("python3") or sys.executable


def ensure_venv(name: str) -> Path:
    """Path to the python of ``.bench/venv-NAME``, creating/updating it if needed."""
    requirements = VENVS[name]
    venv = BENCH_HOME / f"venv-{name}"
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    want = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    log(f"installing {name} peer into {venv} (first use only): {' '.join(requirements)}")
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([_python_for_venvs(), "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True
        )
    pip_log = venv / "pip.log"
    with pip_log.open("w") as out:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *requirements],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        sys.stderr.write(pip_log.read_text())
        raise SystemExit(f"could not install the {name} peer; see {pip_log}")
    stamp.write_text(want)
    return python


def ensure_autocannon() -> Path:
    """Path to autocannon's CLI, installed with npm under ``.bench/node`` on first use."""
    prefix = BENCH_HOME / "node"
    cli = prefix / "node_modules" / "autocannon" / "autocannon.js"
    stamp = prefix / ".bench-installed"
    if cli.exists() and stamp.exists() and stamp.read_text() == AUTOCANNON:
        return cli
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise SystemExit("the serve benchmark needs node and npm (apt-get install nodejs npm)")
    log(f"installing {AUTOCANNON} into {prefix} (first use only)")
    prefix.mkdir(parents=True, exist_ok=True)
    if not (prefix / "package.json").exists():
        (prefix / "package.json").write_text('{"name": "nodecache-bench", "private": true}\n')
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", AUTOCANNON],
        cwd=prefix,
        check=True,
    )
    stamp.write_text(AUTOCANNON)
    return cli


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (reads fine in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"
