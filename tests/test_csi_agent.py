"""The CSI node service of a real agent (``--csi-endpoint``), driven as kubelet drives it:
its models, its pins on the store, its socket folder, a restart."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import Agent, SlowHttpSource, declaration, wait_for
from test_csi import Kubelet, can_mount  # noqa: F401  (the fixture skips where mounting is not allowed)

from nodecache.agent.csi import csi_pb2 as pb
from nodecache.agent.csi import csi_pb2_grpc as pb_grpc
from nodecache.agent.csi.mounts import mount_points, unmount


@pytest.fixture
def home(can_mount: None) -> Iterator[Path]:  # noqa: F811
    path = Path(tempfile.mkdtemp(prefix="csi-"))  # short: the socket path must fit 107 bytes
    yield path
    for point in reversed(mount_points(Path("/proc/self/mountinfo").read_bytes())):
        if point.startswith(str(path.resolve()) + "/"):
            unmount(Path(point))
    shutil.rmtree(path, ignore_errors=True)


class Node:
    """An agent with the CSI service on, and kubelet's side of it."""

    def __init__(self, home: Path) -> None:
        self.agent = Agent(home / "agent")
        self.endpoint = home / "csi.sock"
        self.kubelet = Kubelet(home, None, None)  # type: ignore[arg-type]  # builds requests
        self.channel: grpc.Channel | None = None

    def start(self) -> Node:
        self.agent.start("--csi-endpoint", f"unix://{self.endpoint}")
        self.channel = grpc.insecure_channel(f"unix://{self.endpoint}")
        self.node = pb_grpc.NodeStub(self.channel)
        self.identity = pb_grpc.IdentityStub(self.channel)
        # The CSI socket is bound after the node socket answers; kubelet's registrar
        # waits for it the same way.
        grpc.channel_ready_future(self.channel).result(timeout=30)
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.agent.stop()

    def publish(self, request: pb.NodePublishVolumeRequest) -> None:
        self.node.NodePublishVolume(request, timeout=10)

    def refused(self, request: pb.NodePublishVolumeRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self.publish(request)
        return info.value.code(), info.value.details()

    def unpublish(self, request: pb.NodePublishVolumeRequest) -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(
                volume_id=request.volume_id, target_path=request.target_path
            ),
            timeout=10,
        )

    def mounts(self, model: str) -> int:
        return int((self.agent.model(model) or {}).get("mounts", 0))


@pytest.fixture
def node(home: Path) -> Iterator[Node]:
    node = Node(home)
    yield node
    node.stop()


def cached_models(agent: Agent) -> list[str]:
    return sorted(p.name for p in (agent.cache_dir / "models").iterdir())


def test_a_pod_mounts_a_model_read_only_and_keeps_it_while_mounted(
    node: Node, mlp_dir: Path
) -> None:
    node.start()
    node.agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    node.agent.wait_state("mlp", "Warm")
    assert node.identity.Probe(pb.ProbeRequest()).ready.value is True
    assert node.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id

    request = node.kubelet.request({"model": "mlp"})
    node.publish(request)
    node.publish(request)  # kubelet retries: still one mount
    target = Path(request.target_path)
    assert (target / "model.onnx").read_bytes() == (mlp_dir / "model.onnx").read_bytes()
    with pytest.raises(OSError, match="Read-only"):
        (target / "x").write_text("no")
    assert node.mounts("mlp") == 1

    # The declaration goes while a pod has the model mounted: its files stay.
    (node.agent.declarations / "mlp.yaml").unlink()
    wait_for(lambda: node.agent.model("mlp") is None, what="the model to be retired")
    assert (target / "model.onnx").is_file()
    assert cached_models(node.agent)
    # The last unmount lets normal policy apply: undeclared, the files go.
    node.unpublish(request)
    node.unpublish(request)  # kubelet retries this too
    assert not target.exists()
    wait_for(lambda: not cached_models(node.agent), what="the undeclared model to be deleted")


def test_undeclared_models_and_the_socket_folder(node: Node) -> None:
    node.start()
    code, message = node.refused(node.kubelet.request({"model": "nope"}))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message
    code, message = node.refused(node.kubelet.request({"model": "a", "socket": "true"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    request = node.kubelet.request({"socket": "true"}, volume="node-socket")
    node.publish(request)
    folder = os.open(request.target_path, os.O_RDONLY)  # kubelet's path is too long to bind
    with socket.socket(socket.AF_UNIX) as s:  # the node socket, through the pod's mount
        s.connect(f"/proc/self/fd/{folder}/nodecache.sock")
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    os.close(folder)
    node.unpublish(request)


def test_a_model_not_yet_on_the_node_answers_unavailable_with_progress(
    node: Node, tmp_path: Path, mlp_dir: Path
) -> None:
    source = tmp_path / "slow"
    source.mkdir()
    shutil.copy(mlp_dir / "model.onnx", source / "model.onnx")  # ~10 kB at 4 kB/s
    node.start()
    with SlowHttpSource(source, bytes_per_second=4000) as http:
        node.agent.declare("slow.yaml", declaration("slow", http.url + "model.onnx"))
        wait_for(lambda: node.agent.model("slow"), what="the declaration to be applied")
        request = node.kubelet.request({"model": "slow"})
        code, message = node.refused(request)
        assert code == grpc.StatusCode.UNAVAILABLE and message.startswith("fetching slow: "), (
            message
        )

        def mounted() -> bool:  # kubelet retries with back-off
            try:
                node.publish(request)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False
            return True

        wait_for(mounted, timeout=30, what="the mount once every byte is verified")
        assert (Path(request.target_path) / "model.onnx").read_bytes() == (
            mlp_dir / "model.onnx"
        ).read_bytes()
        node.unpublish(request)


def test_mounts_and_pins_survive_an_agent_restart(node: Node, mlp_dir: Path) -> None:
    node.start()
    node.agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    node.agent.wait_state("mlp", "Warm")
    request = node.kubelet.request({"model": "mlp"})
    node.publish(request)
    node.stop()
    # Undeclared while the agent is down: the restarted agent must not collect it.
    (node.agent.declarations / "mlp.yaml").unlink()
    node.start()
    wait_for(lambda: node.agent.status()["models"] == [], what="the agent to start")
    state = json.loads((node.agent.cache_dir / "csi" / "csi-pins.json").read_text())
    assert list(state) == [request.volume_id]
    assert (Path(request.target_path) / "model.onnx").is_file()
    assert cached_models(node.agent)
    node.unpublish(request)
    assert not Path(request.target_path).exists()
    wait_for(lambda: not cached_models(node.agent), what="the unpinned model to be deleted")


def test_a_model_volume_resolves_a_served_name_as_the_socket_does(
    node: Node, mlp_dir: Path, tmp_path: Path
) -> None:
    """Two versions of one served name: the volume holds the one taking most traffic."""
    canary = tmp_path / "canary"
    shutil.copytree(mlp_dir, canary)
    (canary / "notes.txt").write_text("version 2")
    node.start()
    for name, folder, number, traffic in (("fraud-v1", mlp_dir, "1", 10),
                                          ("fraud-v2", canary, "2", 90)):  # fmt: skip
        serving = {"name": "fraud", "version": number, "traffic": traffic}
        node.agent.declare(f"{name}.yaml", declaration(name, folder.as_uri(), serving=serving))
        node.agent.wait_state(name, "Warm")
    request = node.kubelet.request({"model": "fraud"})
    node.publish(request)
    assert (Path(request.target_path) / "notes.txt").read_text() == "version 2"
    assert (node.mounts("fraud-v2"), node.mounts("fraud-v1")) == (1, 0)
    node.unpublish(request)
    code, _ = node.refused(node.kubelet.request({"model": "fraud-v1"}))
    assert code == grpc.StatusCode.NOT_FOUND  # a declaration's name is not a served name
