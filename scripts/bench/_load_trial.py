"""One load trial in a fresh process: ``python _load_trial.py METHOD MODEL_DIR``.

Prints one JSON line: ``api_s`` (the loader returned), ``ready_s`` (the first answer is
back, so every weight page has been touched), ``infer_s`` (a second, steady-state answer).
Imports happen before the clock starts, for every method alike. Only the standard
library is imported at the top: this file also runs in the Run:ai streamer's venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# The nodecache source tree ours is loaded from (load.py --tree); default this checkout.
ROOT = Path(os.environ.get("NODECACHE_TREE") or Path(__file__).resolve().parents[2])


def _torch_module(model_dir: Path) -> Any:
    """The benchmark's module class, built on the meta device (no memory yet).

    Inside the clock for every method: ours imports and builds it while loading too."""
    import torch

    sys.path.insert(0, str(model_dir))
    from model import Net  # type: ignore[import-not-found]

    with torch.device("meta"):
        return Net()


def _torch_forward(module: Any) -> tuple[float, float]:
    import torch

    x = torch.ones(1, module.width)
    with torch.inference_mode():
        module(x)
    first = time.perf_counter()
    with torch.inference_mode():
        module(x)
    return first, time.perf_counter() - first


def _assign(module: Any, state: dict[str, Any]) -> None:
    module.load_state_dict(state, assign=True, strict=True)
    module.eval()


def trial_safetensors(model_dir: Path) -> tuple[float, float, float, float]:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    module = _torch_module(model_dir)
    _assign(module, load_file(model_dir / "model.safetensors"))
    api = time.perf_counter()
    ready, infer = _torch_forward(module)
    return t0, api, ready, infer


def trial_torch_load(model_dir: Path) -> tuple[float, float, float, float]:
    import torch

    t0 = time.perf_counter()
    module = _torch_module(model_dir)
    state = torch.load(model_dir.parent / "torch-pt" / "model.pt", weights_only=True)
    _assign(module, state)
    api = time.perf_counter()
    ready, infer = _torch_forward(module)
    return t0, api, ready, infer


def trial_torch_load_mmap(model_dir: Path) -> tuple[float, float, float, float]:
    import torch

    t0 = time.perf_counter()
    module = _torch_module(model_dir)
    path = model_dir.parent / "torch-pt" / "model.pt"
    _assign(module, torch.load(path, weights_only=True, mmap=True))
    api = time.perf_counter()
    ready, infer = _torch_forward(module)
    return t0, api, ready, infer


def trial_runai(model_dir: Path) -> tuple[float, float, float, float]:
    from runai_model_streamer import SafetensorsStreamer

    t0 = time.perf_counter()
    module = _torch_module(model_dir)
    state: dict[str, Any] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(model_dir / "model.safetensors"))
        # owned=True (the default in 0.17): each tensor stays valid after the streamer
        # closes, so no copy is needed to keep it.
        for name, tensor in streamer.get_tensors():
            state[name] = tensor
    _assign(module, state)
    api = time.perf_counter()
    ready, infer = _torch_forward(module)
    return t0, api, ready, infer


def _ours(model_dir: Path, fmt: str, entrypoint: str | None, feed: Any) -> tuple[float, ...]:
    import asyncio

    sys.path.insert(0, str(ROOT))
    from nodecache.serve.dataplane import DataPlane
    from nodecache.serve.protocol import InferRequest
    from nodecache.serve.repository import ModelRepository

    if fmt == "torch":
        import nodecache.serve.runtimes.torch
    else:
        import nodecache.serve.runtimes.onnx  # noqa: F401

    async def go() -> tuple[float, ...]:
        repo = ModelRepository()
        plane = DataPlane(repo)
        t0 = time.perf_counter()
        repo.register("bench", model_dir, fmt, entrypoint=entrypoint)
        await repo.load("bench")
        api = time.perf_counter()
        await plane.infer("bench", InferRequest(inputs=feed))
        ready = time.perf_counter()
        await plane.infer("bench", InferRequest(inputs=feed))
        return t0, api, ready, time.perf_counter() - ready

    return asyncio.run(go())


def _attach(model_dir: Path, fmt: str, entrypoint: str | None, feed: Any) -> tuple[float, ...]:
    """A second worker process takes an extra copy of a model warm in the first one,
    through the pool's own path (control calls, load, first answer relayed to it)."""
    import asyncio
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = str(ROOT)  # the workers run ours from the same tree
    os.chdir(ROOT)
    from nodecache.serve.devices import Device
    from nodecache.serve.pool import WorkerPool
    from nodecache.serve.protocol import InferRequest, encode_request
    from nodecache.serve.settings import ServeSettings
    from nodecache.serve.spec import ModelSpec

    body, json_length = encode_request(InferRequest(inputs=feed), binary=True)
    headers = [("Inference-Header-Content-Length", str(json_length))]

    async def go() -> tuple[float, ...]:
        sockets = Path(tempfile.mkdtemp(prefix="attach-"))
        cpu = Device("cpu", 1 << 40, 1 << 38)
        pool = WorkerPool([cpu, cpu], sockets, ServeSettings(spread_at=0))
        await pool.start()
        try:

            async def answer(worker: Any, name: str) -> None:
                status, _, text = await pool.relay(
                    worker, name, "POST", f"/v2/models/{name}/infer", body, headers
                )
                if status != 200:
                    raise RuntimeError(f"infer answered {status}: {text[:200]!r}")

            await pool.register(ModelSpec("bench", model_dir, fmt, entrypoint))
            home = pool.home("bench")
            target = next(w for w in pool.table.workers if w is not home)
            # The second worker has served this kind of model before (its runtime is
            # imported and has computed, as on any busy worker; torch's first import and
            # first forward pass cost ~1 s once per process).
            await pool.client(target).register(ModelSpec("warmup", model_dir, fmt, entrypoint))
            await answer(target, "warmup")
            await pool.client(target).unregister("warmup")
            await pool.load("bench", evict=False)
            await answer(home, "bench")
            await pool.refresh_all()
            t0 = time.perf_counter()
            await pool.make_copy("bench", target)
            api = time.perf_counter()
            await answer(target, "bench")
            ready = time.perf_counter()
            await answer(target, "bench")
            return t0, api, ready, time.perf_counter() - ready
        finally:
            await pool.stop()
            shutil.rmtree(sockets, ignore_errors=True)

    return asyncio.run(go())


def trial_attach_torch(model_dir: Path) -> tuple[float, ...]:
    import numpy as np

    width = json.loads((model_dir / "bench.json").read_text())["width"]
    return _attach(model_dir, "torch", "model:Net", {"x": np.ones((1, width), dtype=np.float32)})


def trial_attach_onnx(model_dir: Path) -> tuple[float, ...]:
    return _attach(model_dir, "onnx", None, _onnx_feed(model_dir))


def trial_ours_torch(model_dir: Path) -> tuple[float, ...]:
    import numpy as np

    width = json.loads((model_dir / "bench.json").read_text())["width"]
    feed = {"x": np.ones((1, width), dtype=np.float32)}
    return _ours(model_dir, "torch", "model:Net", feed)


def _onnx_feed(model_dir: Path) -> dict[str, Any]:
    import numpy as np

    width = json.loads((model_dir.parent / "onnx-meta.json").read_text())["width"]
    return {"input": np.ones((1, width), dtype=np.float32)}


def trial_ours_onnx(model_dir: Path) -> tuple[float, ...]:
    return _ours(model_dir, "onnx", None, _onnx_feed(model_dir))


def _ort(model_dir: Path, *, prepack: bool) -> tuple[float, ...]:
    import onnxruntime as ort

    feed = _onnx_feed(model_dir)
    options = ort.SessionOptions()
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    t0 = time.perf_counter()
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    api = time.perf_counter()
    session.run(None, feed)
    ready = time.perf_counter()
    runs = 20
    for _ in range(runs):
        session.run(None, feed)
    return t0, api, ready, (time.perf_counter() - ready) / runs


def trial_ort(model_dir: Path) -> tuple[float, ...]:
    return _ort(model_dir, prepack=True)


def trial_ort_noprepack(model_dir: Path) -> tuple[float, ...]:
    return _ort(model_dir, prepack=False)


TRIALS = {
    "safetensors": trial_safetensors,
    "torch_load": trial_torch_load,
    "torch_load_mmap": trial_torch_load_mmap,
    "runai": trial_runai,
    "ours_torch": trial_ours_torch,
    "ours_onnx": trial_ours_onnx,
    "attach_torch": trial_attach_torch,
    "attach_onnx": trial_attach_onnx,
    "ort": trial_ort,
    "ort_noprepack": trial_ort_noprepack,
}


def _preimport(method: str) -> None:
    """Pay import costs before the clock, for every method alike."""
    if method in {"ours_onnx", "ort", "ort_noprepack"}:
        import numpy
        import onnxruntime  # noqa: F401
    else:
        import numpy  # noqa: F401
        import torch  # noqa: F401
        from safetensors.torch import load_file  # noqa: F401
    if method == "runai":
        import runai_model_streamer  # noqa: F401


def main() -> None:
    method, model_dir = sys.argv[1], Path(sys.argv[2])
    _preimport(method)
    if len(sys.argv) > 3 and sys.argv[3] == "--wait":
        # Tell the parent we are ready to start the clock once it has dropped caches.
        print("imported", flush=True)
        sys.stdin.readline()
    t0, api, ready, infer = TRIALS[method](model_dir)
    print(json.dumps({"api_s": api - t0, "ready_s": ready - t0, "infer_s": infer}), flush=True)


if __name__ == "__main__":
    main()
