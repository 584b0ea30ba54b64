"""The real agent as a child process: declare, warm, infer over the socket, remove."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
from support import ROOT, Agent, SlowHttpSource, declaration, free_port, wait_for

from nodecache.serve.examples import write_mlp_onnx


def infer_json(agent: Agent, model: str, x: np.ndarray) -> tuple[int, dict]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    return agent.request("POST", f"/v2/models/{model}/infer", body)


def model_folders(agent: Agent) -> list[Path]:
    models = agent.cache_dir / "models"
    return [p for p in models.iterdir() if not p.name.startswith(".")] if models.exists() else []


def test_declare_warm_infer_remove(agent: Agent, mlp_dir: Path) -> None:
    agent.start()
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    warm = agent.wait_state("mlp", "Warm")
    assert warm["device"] == "cpu"

    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    code, answer = infer_json(agent, "mlp", x)
    assert code == 200, answer
    (out,) = answer["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    expected = ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), expected, rtol=1e-5)

    # `nodecache status` asks the running agent over its socket.
    shown = subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "status",
         "--socket-dir", str(agent.socket_dir)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "mlp" in shown and "Warm" in shown

    assert len(model_folders(agent)) == 1
    (agent.declarations / "mlp.yaml").unlink()
    wait_for(lambda: agent.model("mlp") is None, what="model gone from status")
    code, err = infer_json(agent, "mlp", x)
    assert code == 404 and "not found" in err["error"]
    assert model_folders(agent) == []


def test_edit_resyncs_and_restart_reuses_cache(agent: Agent, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write_mlp_onnx(first / "model.onnx", seed=1)
    write_mlp_onnx(second / "model.onnx", seed=2)
    x = np.ones((1, 64), np.float32)
    agent.start()
    agent.declare("m.yaml", declaration("m", first.as_uri()))
    agent.wait_state("m", "Warm")
    _, a = infer_json(agent, "m", x)

    agent.declare("m.yaml", declaration("m", second.as_uri()))
    wait_for(lambda: infer_json(agent, "m", x)[1] != a, what="answers from the edited source")
    agent.wait_state("m", "Warm")
    assert len(model_folders(agent)) == 1  # the old copy was deleted

    assert agent.stop() == 0
    shutil.rmtree(second)  # a restarted agent must not need the source again
    agent.start()
    agent.wait_state("m", "Warm")
    assert infer_json(agent, "m", x)[0] == 200
    downloads = [e for e in agent.events() if e["event"] == "download started"]
    assert len(downloads) == 2  # first and second source, none after the restart


def test_bad_declarations_are_reported_and_good_models_keep_serving(
    agent: Agent, mlp_dir: Path
) -> None:
    agent.start()
    agent.declare("good.yaml", declaration("good", mlp_dir.as_uri()))
    agent.wait_state("good", "Warm")
    bad = {
        "broken.yaml": ("kind: [unclosed", "not valid YAML"),
        "nouri.yaml": (
            json.dumps({"apiVersion": "nodecache.io/v1alpha1", "kind": "LocalModelCache",
                        "metadata": {"name": "nouri"},
                        "spec": {"modelSize": "1Mi", "nodeGroups": ["a"]}}),
            "spec.sourceModelUri is required",
        ),
        "ftp.yaml": (declaration("ftp", "ftp://example.com/m"), "unknown scheme 'ftp'"),
        "nosize.yaml": (declaration("nosize", mlp_dir.as_uri(), size="lots"),
                        "not a Kubernetes quantity"),
        "dup.yaml": (declaration("good", mlp_dir.as_uri()), "already declared in good.yaml"),
    }  # fmt: skip
    for name, (text, _) in bad.items():
        agent.declare(name, text)

    def reported() -> dict[str, str] | None:
        errors = {e["file"]: e["error"] for e in agent.status()["declarationErrors"]}
        return errors if set(errors) == set(bad) else None

    errors = wait_for(reported, what="every bad file reported")
    for name, (_, reason) in bad.items():
        assert reason in errors[name], (name, errors[name])
    logged = {e.get("file") for e in agent.events() if e["event"] == "invalid declaration file"}
    assert logged >= set(bad)
    assert infer_json(agent, "good", np.ones((1, 64), np.float32))[0] == 200
    assert {m["name"] for m in agent.status()["models"]} == {"good"}

    # A good file that turns bad keeps its last good declaration: a typo deletes nothing.
    agent.declare("good.yaml", "apiVersion: [")
    wait_for(lambda: "good.yaml" in {e["file"] for e in agent.status()["declarationErrors"]})
    assert agent.model("good")["state"] == "Warm"
    assert infer_json(agent, "good", np.ones((1, 64), np.float32))[0] == 200


def test_sigkill_mid_download_then_restart_serves_the_complete_model(
    agent: Agent, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    # ~12 MiB of weights at ~4 MiB/s: the kill lands mid-download.
    write_mlp_onnx(source / "model.onnx", inputs=2048, hidden=1536, seed=3)
    digest = hashlib.sha256((source / "model.onnx").read_bytes()).hexdigest()
    with SlowHttpSource(source, bytes_per_second=4 << 20) as http:
        agent.start()
        agent.declare("big.yaml", declaration("big", http.url + "model.onnx"))

        def partly_downloaded() -> bool:
            model = agent.model("big")
            return bool(model and model["state"] == "Downloading" and model["bytes"] > 0)

        wait_for(partly_downloaded, what="a download in progress")
        agent.stop(signal.SIGKILL)
        # Nothing partial is ever published (the kill may land just after a publish).
        for folder in model_folders(agent):
            assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == digest

        http.rate = 64 << 20
        agent.start()
        agent.wait_state("big", "Warm")
    (folder,) = model_folders(agent)
    assert hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest() == digest
    assert not any(e["event"] == "model load failed" for e in agent.events()), (
        "a partial file was handed to the runtime"
    )
    x = np.ones((1, 2048), np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2048],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    assert agent.request("POST", "/v2/models/big/infer", body)[0] == 200


def test_sigterm_removes_the_socket(agent: Agent, mlp_dir: Path) -> None:
    agent.start()
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    assert oct(agent.socket.stat().st_mode & 0o777) == oct(0o660)
    assert agent.stop(signal.SIGTERM) == 0
    assert not agent.socket.exists()
    events = [e["event"] for e in agent.events()]
    assert events[-1] == "agent stopped"


def test_unreachable_source_shows_error_and_next_retry(agent: Agent, tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    agent.start()
    agent.declare("late.yaml", declaration("late", missing.as_uri()))
    failed = agent.wait_state("late", "Error")
    assert str(missing.name) in failed["error"] and failed["nextRetry"] is not None
    code, err = infer_json(agent, "late", np.ones((1, 64), np.float32))
    assert code == 503 and "not ready" in err["error"]
    shown = subprocess.run(
        [sys.executable, "-m", "nodecache.agent.cli", "status",
         "--socket-dir", str(agent.socket_dir)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Error" in shown and "retry in" in shown

    # The source appears: the next retry picks it up without anyone touching the agent.
    write_mlp_onnx(missing / "model.onnx")
    agent.wait_state("late", "Warm", timeout=60)


def test_metrics_endpoint_counts_requests(tmp_path: Path, mlp_dir: Path) -> None:
    port = free_port()
    agent = Agent(tmp_path / "agent")
    try:
        agent.start("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
        agent.wait_state("mlp", "Warm")
        assert infer_json(agent, "mlp", np.ones((1, 64), np.float32))[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
            text = resp.read().decode()
        assert (
            'nodecache_requests_total{code="200",model="mlp",protocol="rest",version="1"} 1.0'
            in text
        )
        # Every metric the example Grafana dashboard plots is one the agent exports.
        dashboard = (ROOT / "daemonset/components/monitoring/nodecache-dashboard.json").read_text()
        plotted = set(re.findall(r"nodecache_[a-z_]+", dashboard))
        families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in plotted}
        missing = [f for f in sorted(families) if f"# TYPE {f} " not in text]
        assert not missing, missing
    finally:
        if agent.proc is not None:
            agent.stop()


def test_a_model_over_the_cache_size_is_refused_before_downloading(
    agent: Agent, tmp_path: Path, mlp_dir: Path
) -> None:
    big = tmp_path / "big"
    write_mlp_onnx(big / "model.onnx", inputs=512, hidden=512)  # ~1 MiB
    agent.start("--cache-size", "256Ki")
    agent.declare("small.yaml", declaration("small", mlp_dir.as_uri()))
    agent.declare("big.yaml", declaration("big", big.as_uri()))
    agent.wait_state("small", "Warm")
    refused = agent.wait_state("big", "Error")
    assert "needs" in refused["error"] and "limit 256" in refused["error"], refused["error"]
    assert agent.model("small")["state"] == "Warm"  # a declared model is never evicted for it
