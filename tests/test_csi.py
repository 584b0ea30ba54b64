"""The CSI node service driven as kubelet drives it: the generated stubs on a real Unix
socket, requests shaped like kubelet's for an inline ephemeral volume, real bind mounts.

The backend here is a small implementation of ``CsiBackend`` over a folder of model folders;
the agent's own backend (declarations, store, pins) has its own tests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest

from nodecache.agent.csi import csi_pb2 as pb
from nodecache.agent.csi import csi_pb2_grpc as pb_grpc
from nodecache.agent.csi.backend import NotFound, PermissionDenied
from nodecache.agent.csi.mounts import bind_readonly, mount_points, unmount
from nodecache.agent.csi.service import DRIVER_NAME, CsiServer, socket_path
from nodecache.agent.csi.state import STATE_FILE, Volume, VolumeState

NAMESPACE = "team-a"
Edit = Callable[[pb.NodePublishVolumeRequest], None]


def _mounts_under(root: Path) -> list[str]:
    prefix = os.path.realpath(root) + "/"
    return [
        p for p in mount_points(Path("/proc/self/mountinfo").read_bytes()) if p.startswith(prefix)
    ]


def _unmount_all(root: Path) -> None:
    for point in reversed(_mounts_under(root)):
        with contextlib.suppress(OSError):
            unmount(Path(point))


@pytest.fixture(scope="module")
def can_mount() -> None:
    """Skip, saying why, where bind mounts are not permitted (not root, no CAP_SYS_ADMIN)."""
    root = Path(tempfile.mkdtemp(prefix="csi-probe-"))
    (root / "a").mkdir()
    (root / "b").mkdir()
    try:
        bind_readonly(root / "a", root / "b")
        unmount(root / "b")
    except OSError as exc:
        pytest.skip(f"bind mounts are not permitted here ({exc}): the CSI tests need root")
    finally:
        _unmount_all(root)
        shutil.rmtree(root)


@dataclass
class FolderBackend:
    """``CsiBackend`` over ``root/models/<name>``: a model is on the node when its folder is.

    ``declared`` maps a model to the namespaces that may use it (None: every namespace),
    which is how both a namespaced cache and a cluster cache's allowedNamespaces resolve.
    """

    root: Path
    declared: dict[str, frozenset[str] | None] = field(default_factory=dict)
    progress: dict[str, str] = field(default_factory=dict)
    pins: dict[str, str] = field(default_factory=dict)
    fetches: list[str] = field(default_factory=list)
    is_ready: bool = True
    node_name: str = "node-a"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "cache"

    def ready(self) -> bool:
        return self.is_ready

    def resolve(self, name: str, namespace: str) -> Path | None:
        if name not in self.declared:
            raise NotFound(name)
        allowed = self.declared[name]
        if allowed is not None and namespace not in allowed:
            raise PermissionDenied(name)
        folder = self.root / "models" / name
        return folder if folder.is_dir() else None

    def start_fetch(self, name: str, namespace: str) -> str:
        self.fetches.append(name)
        return self.progress.get(name, "queued")

    def pin(self, volume_id: str, name: str, namespace: str) -> None:
        self.pins[volume_id] = name

    def unpin(self, volume_id: str) -> None:
        self.pins.pop(volume_id, None)

    def add_model(self, name: str) -> Path:
        folder = self.root / "models" / name
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"weights of " + name.encode())
        return folder


@pytest.fixture
def home(can_mount: None) -> Iterator[Path]:
    """A short folder (Unix socket paths are limited to 108 bytes); every mount under it
    is undone at the end, whatever the test did."""
    root = Path(tempfile.mkdtemp(prefix="csi-"))
    try:
        yield root
    finally:
        _unmount_all(root)
        shutil.rmtree(root)


@pytest.fixture
def backend(home: Path) -> FolderBackend:
    b = FolderBackend(home)
    b.socket_dir.mkdir()
    b.declared = {"fraud": frozenset({NAMESPACE}), "shared": None, "listed": frozenset({"team-b"})}
    b.add_model("fraud")
    b.add_model("shared")
    b.add_model("listed")
    return b


@dataclass
class Kubelet:
    """The CSI client side as kubelet uses it: one channel, the generated stubs."""

    home: Path
    identity: pb_grpc.IdentityStub
    node: pb_grpc.NodeStub

    def request(
        self,
        attrs: dict[str, str],
        *,
        pod: str = "pod-1",
        volume: str = "weights",
        namespace: str = NAMESPACE,
        readonly: bool = False,
    ) -> pb.NodePublishVolumeRequest:
        """A NodePublishVolumeRequest as kubelet sends it for an inline CSI volume of a pod
        (kubelet's volume handle, target path, podInfoOnMount context), with the parent of
        the target path created, as kubelet does."""
        uid = hashlib.md5(pod.encode()).hexdigest()
        uid = f"{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:]}"
        volume_dir = self.home / "kubelet/pods" / uid / "volumes/kubernetes.io~csi" / volume
        volume_dir.mkdir(parents=True, exist_ok=True)
        (volume_dir / "vol_data.json").write_text("{}")
        context = {
            **attrs,
            "csi.storage.k8s.io/pod.name": pod,
            "csi.storage.k8s.io/pod.namespace": namespace,
            "csi.storage.k8s.io/pod.uid": uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "true",
        }
        mode = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        return pb.NodePublishVolumeRequest(
            volume_id="csi-" + hashlib.sha256(f"{uid}{volume}".encode()).hexdigest(),
            target_path=str(volume_dir / "mount"),
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(),
                access_mode=pb.VolumeCapability.AccessMode(mode=mode),
            ),
            readonly=readonly,
            volume_context=context,
        )

    async def publish(self, request: pb.NodePublishVolumeRequest) -> None:
        await self.node.NodePublishVolume(request, timeout=10)

    async def unpublish(self, request: pb.NodePublishVolumeRequest) -> None:
        await self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(
                volume_id=request.volume_id, target_path=request.target_path
            ),
            timeout=10,
        )

    async def refused(self, request: pb.NodePublishVolumeRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.publish(request)
        return info.value.code(), info.value.details() or ""


@pytest.fixture
async def server(backend: FolderBackend, home: Path) -> AsyncIterator[CsiServer]:
    srv = CsiServer(backend, f"unix://{home}/plugins/csi.nodecache.io/csi.sock")
    await srv.start()
    yield srv
    await srv.stop(grace=0)


@pytest.fixture
async def kubelet(server: CsiServer, home: Path) -> AsyncIterator[Kubelet]:
    async with grpc.aio.insecure_channel(f"unix://{server.path}") as channel:
        yield Kubelet(home, pb_grpc.IdentityStub(channel), pb_grpc.NodeStub(channel))


def _mounted(target: str) -> int:
    """How many mounts sit at ``target``."""
    return mount_points(Path("/proc/self/mountinfo").read_bytes()).count(target)


# -- Identity ------------------------------------------------------------------------------


async def test_identity(kubelet: Kubelet, backend: FolderBackend) -> None:
    info = await kubelet.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == (DRIVER_NAME, version("nodecache"))
    caps = await kubelet.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []
    probe = await kubelet.identity.Probe(pb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value is True
    backend.is_ready = False
    probe = await kubelet.identity.Probe(pb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value is False


async def test_node_info_and_unimplemented(kubelet: Kubelet) -> None:
    info = await kubelet.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    caps = await kubelet.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    assert list(caps.capabilities) == []
    for call, request in [
        (kubelet.node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id="v")),
        (kubelet.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id="v")),
        (kubelet.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id="v")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info_:
            await call(request)
        assert info_.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- Publishing a model --------------------------------------------------------------------


async def test_model_mount_is_read_only_and_pinned(
    kubelet: Kubelet, backend: FolderBackend, server: CsiServer, caplog: pytest.LogCaptureFixture
) -> None:
    request = kubelet.request({"model": "fraud"}, readonly=False)  # the pod asked rw
    target = Path(request.target_path)
    assert not target.exists()  # kubelet makes the parent only
    with caplog.at_level(logging.INFO, logger="nodecache.agent.csi"):
        await kubelet.publish(request)
    assert (target / "model.onnx").read_bytes() == b"weights of fraud"
    assert _mounted(str(target)) == 1
    with pytest.raises(OSError) as info:
        (target / "model.onnx").write_bytes(b"changed")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        (target / "new").mkdir()
    assert info.value.errno == errno.EROFS
    assert backend.pins == {request.volume_id: "fraud"}
    assert server.volumes.mounts() == {"fraud": 1}
    assert any(
        request.volume_id in r.getMessage() and "team-a/pod-1" in r.getMessage()
        for r in caplog.records
    )

    await kubelet.unpublish(request)
    assert _mounted(str(target)) == 0
    assert not target.exists()  # the driver removes what it created
    assert backend.pins == {}
    assert server.volumes.mounts() == {}
    assert (backend.root / "models/fraud/model.onnx").read_bytes() == b"weights of fraud"


async def test_socket_mount(kubelet: Kubelet, backend: FolderBackend) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(backend.socket_dir / "nodecache.sock"))
    listener.listen()
    try:
        request = kubelet.request({"socket": "true"})
        await kubelet.publish(request)
        target = Path(request.target_path)
        short = backend.root / "p"  # kubelet's paths are longer than a socket address
        short.symlink_to(target)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(short / "nodecache.sock"))  # a read-only folder still connects
            peer, _ = listener.accept()
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"
            peer.close()
        with pytest.raises(OSError) as info:
            (target / "other.sock").write_text("x")
        assert info.value.errno == errno.EROFS
        assert backend.pins == {}
        await kubelet.unpublish(request)
        assert _mounted(request.target_path) == 0
    finally:
        listener.close()


async def test_two_pods_one_model(
    kubelet: Kubelet, backend: FolderBackend, server: CsiServer
) -> None:
    first = kubelet.request({"model": "shared"}, pod="pod-1")
    second = kubelet.request({"model": "shared"}, pod="pod-2", namespace="team-z")
    await kubelet.publish(first)
    await kubelet.publish(second)
    assert server.volumes.mounts() == {"shared": 2}
    assert backend.pins == {first.volume_id: "shared", second.volume_id: "shared"}
    await kubelet.unpublish(first)
    assert backend.pins == {second.volume_id: "shared"}
    assert server.volumes.mounts() == {"shared": 1}
    await kubelet.unpublish(second)


# -- Refusals ------------------------------------------------------------------------------


def _drop_context(key: str) -> Edit:
    def edit(r: pb.NodePublishVolumeRequest) -> None:
        del r.volume_context[key]

    return edit


def _set_context(key: str, value: str) -> Edit:
    def edit(r: pb.NodePublishVolumeRequest) -> None:
        r.volume_context[key] = value

    return edit


def _set(name: str, value: str) -> Edit:
    return lambda r: setattr(r, name, value)


@pytest.mark.parametrize(
    ("edit", "code", "names"),
    [
        (_set("volume_id", ""), "INVALID_ARGUMENT", "volume_id"),
        (_set("target_path", ""), "INVALID_ARGUMENT", "target_path"),
        (_set("target_path", "pods/x/mount"), "INVALID_ARGUMENT", "absolute"),
        (_set("target_path", "/var/lib/kubelet/pods/../../../etc"), "INVALID_ARGUMENT", ".."),
        (_set("target_path", "/var/lib/kubelet/./pods/x"), "INVALID_ARGUMENT", "target_path"),
        (_set("target_path", "//var/lib/x"), "INVALID_ARGUMENT", "target_path"),
        (lambda r: r.ClearField("volume_capability"), "INVALID_ARGUMENT", "volume_capability"),
        (lambda r: r.volume_capability.block.SetInParent(), "FAILED_PRECONDITION", "block"),
        (_drop_context("model"), "INVALID_ARGUMENT", "'model'"),
        (_set_context("socket", "true"), "INVALID_ARGUMENT", "'socket'"),
        (_set_context("size", "1Gi"), "INVALID_ARGUMENT", "'size'"),
        (_set_context("model", ""), "INVALID_ARGUMENT", "'model'"),
        (_drop_context("csi.storage.k8s.io/ephemeral"), "INVALID_ARGUMENT", "ephemeral"),
        (_drop_context("csi.storage.k8s.io/pod.namespace"), "INVALID_ARGUMENT", "pod.namespace"),
    ],
)
async def test_invalid_requests(
    kubelet: Kubelet, backend: FolderBackend, edit: Edit, code: str, names: str
) -> None:
    request = kubelet.request({"model": "fraud"})
    edit(request)
    got, message = await kubelet.refused(request)
    assert (got.name, names in message) == (code, True), message
    assert backend.pins == {}
    assert _mounts_under(backend.root) == []


async def test_socket_must_be_true(kubelet: Kubelet) -> None:
    code, message = await kubelet.refused(kubelet.request({"socket": "yes"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'socket'" in message


async def test_undeclared_model(kubelet: Kubelet) -> None:
    code, message = await kubelet.refused(kubelet.request({"model": "nope"}))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message


@pytest.mark.parametrize(
    ("model", "namespace", "allowed"),
    [
        ("fraud", "team-b", False),  # a namespaced cache of team-a
        ("listed", "team-a", False),  # a cluster cache whose allowedNamespaces is [team-b]
        ("listed", "team-b", True),
        ("shared", "anyone", True),  # a cluster cache without allowedNamespaces
    ],
)
async def test_namespace_decides(
    kubelet: Kubelet, backend: FolderBackend, model: str, namespace: str, allowed: bool
) -> None:
    request = kubelet.request({"model": model}, namespace=namespace)
    if allowed:
        await kubelet.publish(request)
        assert _mounted(request.target_path) == 1
        await kubelet.unpublish(request)
    else:
        code, message = await kubelet.refused(request)
        assert code == grpc.StatusCode.PERMISSION_DENIED and namespace in message
        assert backend.pins == {} and not Path(request.target_path).exists()


async def test_not_yet_fetched_then_mounted(kubelet: Kubelet, backend: FolderBackend) -> None:
    backend.declared["big"] = None
    backend.progress["big"] = "37% of 1.2 GiB"
    request = kubelet.request({"model": "big"})
    for _ in range(2):  # kubelet retries with back-off
        code, message = await kubelet.refused(request)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert message == "fetching big: 37% of 1.2 GiB"
    assert backend.fetches == ["big", "big"]
    assert backend.pins == {} and not Path(request.target_path).exists()
    backend.add_model("big")  # every byte verified
    await kubelet.publish(request)
    assert (Path(request.target_path) / "model.onnx").read_bytes() == b"weights of big"
    assert backend.pins == {request.volume_id: "big"}
    await kubelet.unpublish(request)


async def test_agent_still_starting(kubelet: Kubelet, backend: FolderBackend) -> None:
    backend.is_ready = False
    code, _ = await kubelet.refused(kubelet.request({"model": "fraud"}))
    assert code == grpc.StatusCode.UNAVAILABLE


# -- Idempotency and restarts --------------------------------------------------------------


async def test_publish_twice_is_one_mount(
    kubelet: Kubelet, backend: FolderBackend, server: CsiServer
) -> None:
    request = kubelet.request({"model": "fraud"})
    await kubelet.publish(request)
    await kubelet.publish(request)
    assert _mounted(request.target_path) == 1
    assert server.volumes.mounts() == {"fraud": 1}
    other = kubelet.request({"model": "shared"})  # same pod, volume and target: another model
    code, message = await kubelet.refused(other)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "fraud" in message
    await kubelet.unpublish(request)
    await kubelet.unpublish(request)
    assert _mounted(request.target_path) == 0 and backend.pins == {}


async def test_unpublish_unknown_target(kubelet: Kubelet) -> None:
    request = kubelet.request({"model": "fraud"}, pod="never-published")
    await kubelet.unpublish(request)
    assert not Path(request.target_path).exists()


async def test_restart_finds_mounts_again(
    kubelet: Kubelet, backend: FolderBackend, server: CsiServer, home: Path
) -> None:
    kept = kubelet.request({"model": "fraud"}, pod="kept")
    gone = kubelet.request({"model": "shared"}, pod="gone")
    await kubelet.publish(kept)
    await kubelet.publish(gone)
    await server.stop(grace=0)  # the agent dies; mounts stay with the pods
    unmount(Path(gone.target_path))  # and one mount disappears while it is down

    fresh = FolderBackend(home, declared=dict(backend.declared))  # a new process: no pins
    restarted = CsiServer(fresh, f"unix://{server.path}")
    await restarted.start()
    try:
        assert fresh.pins == {kept.volume_id: "fraud"}
        assert restarted.volumes.mounts() == {"fraud": 1}
        assert (home / "cache" / STATE_FILE).exists()
        async with grpc.aio.insecure_channel(f"unix://{restarted.path}") as channel:
            again = Kubelet(home, pb_grpc.IdentityStub(channel), pb_grpc.NodeStub(channel))
            await again.publish(kept)  # kubelet's periodic re-publish: still one mount
            assert _mounted(kept.target_path) == 1
            await again.unpublish(kept)
            await again.unpublish(gone)
        assert _mounted(kept.target_path) == 0
        assert fresh.pins == {} and restarted.volumes.mounts() == {}
        assert _mounts_under(home) == []
    finally:
        await restarted.stop(grace=0)


def test_unreadable_state_is_empty(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    state = VolumeState(tmp_path)
    state.load()
    assert state.volumes == {}
    state.put(Volume("csi-1", "/t", "fraud", "ns/pod"))
    again = VolumeState(tmp_path)
    again.load()
    assert again.volumes == {"/t": Volume("csi-1", "/t", "fraud", "ns/pod")}


# -- Pure parts ----------------------------------------------------------------------------


def test_mountinfo_escapes() -> None:
    text = b"42 27 254:0 /src /tmp/a\\040b\\134c ro - ext4 /dev/vda rw\n43 1 2:0 / /x rw - x y z\n"
    assert mount_points(text) == ["/tmp/a b\\c", "/x"]


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [("unix:///csi/csi.sock", "/csi/csi.sock"), ("unix:/csi/csi.sock", "/csi/csi.sock")],
)
def test_endpoint(endpoint: str, path: str) -> None:
    assert socket_path(endpoint) == Path(path)


@pytest.mark.parametrize("endpoint", ["tcp://1.2.3.4:5", "unix://csi.sock", "unix:///" + "a" * 120])
def test_endpoint_refused(endpoint: str) -> None:
    with pytest.raises(ValueError):
        socket_path(endpoint)
