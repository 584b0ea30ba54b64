"""The container image: built from the Containerfile with scripts/image on a local Debian base
(no registry is reachable here), then run as a user runs it: ``nodecache --version``, and a
standalone agent answering an inference through a socket folder bind-mounted from the host.

podman, runc and debootstrap are installed by ``scripts/image-tools install`` where missing
(as root, with apt-get); where that cannot be done the test is skipped, saying why. Images and
the base live in a private podman store under ~/.cache/nodecache/image-test, kept between
runs, so that a second run rebuilds only what changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support import ROOT, declaration, uds_request, wait_for

pytestmark = [pytest.mark.image, pytest.mark.slow]

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nodecache/image-test"
TAG = "localhost/nodecache-test:latest"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TORCH_VERSION = "2.13.0"  # the Containerfile's default, and pyproject's torch pin

# This sandbox cannot raise resource limits (podman's defaults fail with "setrlimit ...
# operation not permitted", build steps too), and crun refuses its hybrid cgroups.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def storage_conf(driver: str) -> str:
    return (
        f'[storage]\ndriver = "{driver}"\n'
        f'graphroot = "{CACHE / f"storage-{driver}"}"\nrunroot = "{CACHE / f"run-{driver}"}"\n'
    )


def run(command: list[str], env: dict[str, str], timeout: float) -> str:
    """Runs ``command``; on failure the assertion shows its output."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(command)}: exit {done.returncode}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def podman() -> dict[str, str]:
    """The environment that points podman at the private store and settings."""
    tools = subprocess.run(
        [str(ROOT / "scripts/image-tools"), "install"], capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    if tools.returncode == 3:
        pytest.skip(f"cannot build images here: {tools.stderr.strip()}")
    assert tools.returncode == 0, tools.stderr
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(CACHE / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(CACHE / "storage.conf"),
    }
    for driver in ("overlay", "vfs"):  # overlay is 2-3x faster where the filesystem allows
        (CACHE / "storage.conf").write_text(storage_conf(driver))
        info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True)
        if info.returncode == 0:
            return env
    pytest.fail(f"podman info fails with overlay and vfs storage:\n{info.stderr}")


def local_torch_wheels() -> list[Path]:
    """Folders of pip's find-links here that hold the CPU torch wheel (a local copy)."""
    shown = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    places = os.environ.get("PIP_FIND_LINKS", "").split()
    for line in shown.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            places += value.strip("'\"").split()
    wheel = f"torch-{TORCH_VERSION}+cpu-*.whl"
    return sorted({Path(p) for p in places if Path(p).is_dir() and any(Path(p).glob(wheel))})


def unreachable(urls: list[str]) -> str | None:
    """Why the first of ``urls`` that does not answer from here fails, if one does not."""
    for url in urls:
        try:
            urllib.request.urlopen(url, timeout=15).close()
        except urllib.error.HTTPError:
            continue  # it answers
        except OSError as exc:
            return f"{url} does not answer from here ({exc})"
    return None


def build_or_skip(command: list[str], env: dict[str, str], needs: list[str]) -> str:
    """Runs a step that downloads from ``needs`` (and the mirror it names, "... from URL");
    skips, saying why, when one is unreachable (no network here is not a defect of the
    image), else fails with the step's output."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode == 0:
        return done.stdout.strip()
    if why := unreachable(needs + re.findall(r" from (https?://\S+)", done.stderr)):
        pytest.skip(f"{shlex.join(command)} needs the network: {why}")
    tail = "\n".join(done.stderr.splitlines()[-40:])
    pytest.fail(f"{shlex.join(command)}: exit {done.returncode}\n{tail}")


@pytest.fixture(scope="module")
def image(podman: dict[str, str]) -> str:
    """The image built by scripts/image from the local Debian base; its id."""
    base = build_or_skip([str(ROOT / "scripts/image-tools"), "base"], podman, [])
    env = {**podman, "BASE": base, "IMAGE": TAG}
    extra = ["--network", "host"]
    needs = [os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"]
    if wheels := local_torch_wheels():
        # The CPU torch wheel from this machine's disk rather than PyTorch's index.
        env["TORCH_INDEX_URL"] = ""
        extra += ["--build-arg", "PIP_FIND_LINKS=" + " ".join(map(str, wheels))]
        extra += [arg for w in wheels for arg in ("--volume", f"{w}:{w}:ro")]
    else:
        needs.append("https://download.pytorch.org/whl/cpu/")  # the Containerfile's default
    image_id = build_or_skip([str(ROOT / "scripts/image"), *extra], env, needs)
    assert image_id, "scripts/image printed no image id"
    # Superseded images go; this build's layers stay, as the next run's cache.
    run(["podman", "image", "prune", "--force"], podman, timeout=300)
    return image_id


# The modules of agent/, cache/ and serve/, hashed by relative path and content: given their
# folders, or else the folders of the installed nodecache.agent, .cache and .serve.
DIGEST = """
import hashlib, importlib, pathlib, sys
roots = sys.argv[1:] or [pathlib.Path(importlib.import_module("nodecache." + n).__file__).parent
                         for n in ("agent", "cache", "serve")]
h = hashlib.sha256()
for name, root in zip(("agent", "cache", "serve"), map(pathlib.Path, roots)):
    for f in sorted(root.rglob("*.py")):
        h.update(f"{name}/{f.relative_to(root)}".encode() + b"\\0" + f.read_bytes())
print(h.hexdigest())
"""


def test_version_labels_and_non_root(podman: dict[str, str], image: str) -> None:
    out = run(["podman", "run", "--rm", "--network", "none", "--user", "10001", image,
               "--version"], podman, timeout=120)  # fmt: skip
    assert out.strip() == f"nodecache {PROJECT['version']}"

    (config,) = json.loads(run(["podman", "image", "inspect", image], podman, timeout=60))
    labels = config["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == PROJECT["version"]
    assert labels["org.opencontainers.image.title"] == "nodecache"
    assert labels["org.opencontainers.image.licenses"] == PROJECT["license"]
    assert config["Config"]["Entrypoint"] == ["nodecache"]


def test_image_holds_the_code_it_was_built_from(podman: dict[str, str], image: str) -> None:
    """A rebuild after a code change must not reuse a cached layer holding the old code."""
    command = ["podman", "run", "--rm", "-i", "--network", "none", "--entrypoint", "python",
               image, "-"]  # fmt: skip
    done = subprocess.run(command, env=podman, input=DIGEST, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    here = subprocess.run(
        [sys.executable, "-c", DIGEST, *(str(ROOT / d) for d in ("agent", "cache", "serve"))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout == here.stdout


@pytest.fixture
def agent_container(podman: dict[str, str], image: str, tmp_path: Path) -> Iterator[Path]:
    """A standalone agent in the image, declarations and the model folder bind-mounted
    read-only, the socket folder read-write; yields the socket's path on this host."""
    from nodecache.serve.examples import write_mlp_onnx

    declarations, models, sockets = (tmp_path / d for d in ("declarations", "models", "run"))
    for folder in (declarations, models, sockets):
        folder.mkdir()
    write_mlp_onnx(models / "mlp" / "model.onnx")
    (declarations / "mlp.yaml").write_text(declaration("mlp", "file:///models/mlp"))
    name = f"nodecache-test-{os.getpid()}"
    log = (tmp_path / "agent.log").open("w")
    command = [
        "podman", "run", "--rm", "--name", name, "--network", "none",
        "--volume", f"{declarations}:/declarations:ro",
        "--volume", f"{models}:/models:ro",
        "--volume", f"{sockets}:/run/nodecache",
        image, "agent", "--declarations", "/declarations", "--socket-dir", "/run/nodecache",
        "--cache-dir", "/var/lib/nodecache/cache", "--metrics-port", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=podman, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield sockets / "nodecache.sock"
        subprocess.run(["podman", "stop", "--time", "20", name], env=podman, capture_output=True)
        assert proc.wait(30) == 0, (tmp_path / "agent.log").read_text()
    finally:
        if proc.poll() is None:
            subprocess.run(["podman", "rm", "--force", name], env=podman, capture_output=True)
            proc.wait(30)


def test_agent_in_image_answers_through_mounted_socket(
    agent_container: Path, tmp_path: Path
) -> None:
    def model_state() -> str | None:
        if not agent_container.exists():
            return None
        try:
            code, _, body = uds_request(agent_container, "GET", "/nodecache/v1/status")
        except OSError:
            return None
        states = {m["name"]: m["state"] for m in json.loads(body)["models"]} if code == 200 else {}
        return states.get("mlp")

    wait_for(
        lambda: model_state() == "Warm", timeout=120, what="the agent in the image to warm mlp"
    )

    x = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    code, _, answer = uds_request(agent_container, "POST", "/v2/models/mlp/infer", body)
    assert code == 200, answer
    (out,) = json.loads(answer)["outputs"]
    assert out["shape"] == [2, 10]
    model = tmp_path / "models/mlp/model.onnx"
    expected = ort.InferenceSession(str(model)).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 10), expected,
                               rtol=1e-5)  # fmt: skip
