"""A real MLflow tracking server for the tests, with artifact proxying and basic auth.

MLflow (~850 MB) lives in its own venv under ``.bench/venv-mlflow``, installed on first use
and reused after (the project never depends on it). The server runs MLflow's ``basic-auth``
app so wrong credentials are refused as in production; the tests seed it through the REST
API (runs, artifacts through the proxy, registered models, versions, aliases) with urllib:
no mlflow import in the test process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from support import ROOT, free_port

MLFLOW = "mlflow[auth]==3.17.2"
VENV = ROOT / ".bench" / "venv-mlflow"
ADMIN = "admin"
PASSWORD = "nodecache-admin-pw-1"


def ensure_mlflow() -> Path:
    """The ``mlflow`` executable of the cached venv, installing it on first use (~75 s)."""
    exe = VENV / "bin" / "mlflow"
    stamp = VENV / ".installed"
    if exe.exists() and stamp.exists() and stamp.read_text() == MLFLOW:
        return exe
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", MLFLOW],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"could not install {MLFLOW}: {done.stderr[-2000:]}")
    stamp.write_text(MLFLOW)
    return exe


@dataclass
class MlflowServer:
    url: str
    root: Path

    def env(self, password: str = PASSWORD, user: str = ADMIN) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }

    def _request(self, method: str, path: str, body: bytes | None, ctype: str) -> Any:
        pair = base64.b64encode(f"{ADMIN}:{PASSWORD}".encode()).decode()
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Authorization": f"Basic {pair}", "Content-Type": ctype},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data else {}

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST call as the admin (``/api/2.0/mlflow/`` + ``path``)."""
        if method == "GET":
            path = f"{path}?{urlencode(body or {})}"
            return self._request("GET", f"/api/2.0/mlflow/{path}", None, "application/json")
        data = json.dumps(body or {}).encode()
        return self._request(method, f"/api/2.0/mlflow/{path}", data, "application/json")

    def log_run(self, files: dict[str, bytes], under: str = "") -> str:
        """A new run whose artifacts (under ``under``) are ``files``, uploaded through the
        artifact proxy; returns the run id."""
        run = self.api("POST", "runs/create", {"experiment_id": "0"})["run"]["info"]
        root = run["artifact_uri"]  # mlflow-artifacts:/0/<run>/artifacts
        assert root.startswith("mlflow-artifacts:/"), root
        base = root[len("mlflow-artifacts:") :].strip("/")
        for rel, data in files.items():
            path = "/".join(p for p in (base, under, rel) if p)
            self._request(
                "PUT",
                f"/api/2.0/mlflow-artifacts/artifacts/{quote(path)}",
                data,
                "application/octet-stream",
            )
        return run["run_id"]

    def register(self, name: str, source: str, run_id: str | None = None) -> str:
        """A new version of ``name`` (created if needed) from ``source``; its number."""
        try:
            self.api("POST", "registered-models/create", {"name": name})
        except urllib.error.HTTPError as exc:
            if exc.code != 400:  # RESOURCE_ALREADY_EXISTS
                raise
        body = {"name": name, "source": source, **({"run_id": run_id} if run_id else {})}
        return self.api("POST", "model-versions/create", body)["model_version"]["version"]

    def alias(self, name: str, alias: str, version: str) -> None:
        body = {"name": name, "alias": alias, "version": version}
        self.api("POST", "registered-models/alias", body)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` with ``--serve-artifacts`` and basic auth, on a free loopback port."""
    exe = ensure_mlflow()
    root = tmp_path_factory.mktemp("mlflow")
    (root / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root}/auth.db\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "nodecache-tests",
    }
    log = (root / "server.log").open("wb")
    command = [
        str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--app-name", "basic-auth", "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.2)
        yield MlflowServer(url, root)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (it forks workers), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a clean exit


def conformance_parts(server: MlflowServer) -> tuple[Any, Any]:
    """``put`` and ``uri`` for the conformance suite: a prefix is a registered model whose
    files are one run's artifacts; ``uri(prefix/path)`` registers a new version from that
    path (the folder, or one file) and names it. A prefix never put is an unknown model."""
    runs: dict[str, str] = {}

    def put(prefix: str, files: dict[str, bytes]) -> None:
        runs[prefix] = server.log_run(files, under=prefix)

    def uri(rest: str) -> str:
        prefix, _, path = rest.partition("/")
        run = runs.get(prefix)
        if run is None:
            return f"models:/{prefix}/1"
        source = f"runs:/{run}/{prefix}/{path}".rstrip("/")
        return f"models:/{prefix}/{server.register(prefix, source, run)}"

    return put, uri
