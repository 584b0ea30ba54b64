"""What the DaemonSet promises a pod in a "restricted" namespace, on a real agent: run with the
DaemonSet's user and group, its mounted model files and its socket are open to a non-root
user that adds the agent's group (``supplementalGroups``), and closed to one that does not."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import declaration
from test_csi import can_mount  # noqa: F401  (the fixture skips where mounting is not allowed)
from test_csi_agent import Node, home  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parent.parent / "daemonset" / "examples"
DAEMONSET = EXAMPLES.parent / "agent-daemonset.yaml"
# The pod's interpreter: the system one, since a non-root user cannot run the test's own
# (under root's home).
PYTHON = Path("/usr/bin/python3")

# The pod's side: read a file of the model mount and call the socket mount, through folders
# passed as descriptors (kubelet's paths are too long for a socket address, and the test's
# home is private to root, as kubelet's folder is; a pod sees only its mount).
POD = """
import socket, sys
model, sock = sys.argv[1:]
try:
    size = len(open(f"/proc/self/fd/{model}/model.onnx", "rb").read())
except OSError as exc:
    size = type(exc).__name__
with socket.socket(socket.AF_UNIX) as s:
    try:
        s.connect(f"/proc/self/fd/{sock}/nodecache.sock")
        s.sendall(b"GET /v2/health/live HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        answer = s.recv(12).decode()
    except OSError as exc:
        answer = type(exc).__name__
print(size, answer)
"""


def _agent_container() -> dict[str, Any]:
    spec = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "agent")


def _example_pod(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())["spec"]["securityContext"]


@pytest.fixture
def node(home: Path) -> Iterator[Node]:  # noqa: F811
    """An agent run as the DaemonSet runs it: root, with the DaemonSet's group."""
    context = _agent_container()["securityContext"]
    assert context["runAsUser"] == 0 == os.geteuid()
    node = Node(home)
    egid = os.getegid()
    os.setegid(context["runAsGroup"])  # inherited by the agent; restored for the tests
    try:
        node.start()
    finally:
        os.setegid(egid)
    yield node
    node.stop()


def test_a_non_root_pod_with_the_agent_group_reads_models_and_calls_the_socket(
    node: Node, mlp_dir: Path
) -> None:
    if not PYTHON.exists():
        pytest.skip(f"{PYTHON} (an interpreter any user may run) is not installed")
    node.agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    node.agent.wait_state("mlp", "Warm")
    model = node.kubelet.request({"model": "mlp"})
    sock = node.kubelet.request({"socket": "true"}, volume="node-socket")
    node.publish(model)
    node.publish(sock)
    folders = [os.open(r.target_path, os.O_RDONLY | os.O_DIRECTORY) for r in (model, sock)]
    try:

        def pod(context: dict[str, Any], groups: list[int]) -> list[str]:
            done = subprocess.run(
                [str(PYTHON), "-I", "-c", POD, *map(str, folders)],
                user=context["runAsUser"], group=context["runAsGroup"], extra_groups=groups,
                pass_fds=folders, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout.strip().split(" ", 1)

        size = str((mlp_dir / "model.onnx").stat().st_size)
        for example in ("model-folder-pod.yaml", "socket-pod.yaml"):
            context = _example_pod(example)
            assert context["runAsUser"] != 0
            assert pod(context, context["supplementalGroups"]) == [size, "HTTP/1.1 200"]
            # The same user without the agent's group: neither the files nor the socket.
            assert pod(context, []) == ["PermissionError", "PermissionError"]
    finally:
        for folder in folders:
            os.close(folder)
        node.unpublish(model)
        node.unpublish(sock)
