"""Who calls, as the kernel says, against callers that try to be someone else: a PID
reused by another process after the connector exited, and cgroup paths that merely look
like a pod's. Real processes, real sockets; PID reuse is made to happen in a PID namespace
of our own (``unshare``), where this test may choose the next PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT, Agent, orphaned_connection

from nodecache.serve.peers import pod_uid_of

UID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

# Runs as PID 1 of a new user and PID namespace: a connector hands its connection to a
# child and exits; a victim is then started on the connector's PID (ns_last_pid).
# ``cached``: the peer was found while the connector still ran, else only after the reuse.
# ``fallback``: as on kernels without SO_PEERPIDFD (start time against the accept time).
_REUSE = textwrap.dedent(
    """
    import os, socket, sys, tempfile, time
    from nodecache.serve import peers
    from nodecache.serve.peers import CallerGone, boot_seconds, connection_peer

    cached, fallback = sys.argv[1] == "cached", sys.argv[2] == "fallback"
    if fallback:
        peers.SO_PEERPIDFD = 0x7FFF  # an option no kernel has: ENOPROTOOPT, as before 6.5

    class Connection:  # what aiohttp's protocol and transport offer
        def __init__(self, sock):
            self.sock, self.accepted = sock, boot_seconds()
        def get_extra_info(self, name):
            return self.sock

    path = os.path.join(tempfile.mkdtemp(), "node.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    connector = os.fork()
    if connector == 0:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        if os.fork() == 0:  # the holder keeps the connection
            os.write(ready_w, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(go_r, 1)
        os._exit(0)
    os.read(ready_r, 1)
    conn, _ = server.accept()
    connection = Connection(conn)
    if cached:
        assert connection_peer(connection, connection).pid == connector
    os.write(go_w, b"x")
    os.waitpid(connector, 0)
    time.sleep(0.05)  # a clock tick or more after the accept
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(connector - 1))
    victim = os.fork()
    if victim == 0:
        time.sleep(60)
        os._exit(0)
    assert victim == connector, (victim, connector)
    try:
        peer = connection_peer(connection, connection)
    except CallerGone as exc:
        print("refused:", exc)
    else:
        print("taken as", peer.pid, "started", peer.started)
    """
)


def _unshare() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run([unshare, "-Urpf", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user and PID namespaces here: {probe.stderr.decode()[:200]}")
    return [unshare, "-Urpf", "--mount-proc"]


@pytest.mark.parametrize("found", ["cached", "after-reuse"])
@pytest.mark.parametrize("hold", ["pidfd", "fallback"])
def test_a_reused_pid_is_not_the_connections_caller(found: str, hold: str) -> None:
    command = [*_unshare(), sys.executable, "-P", "-c", _REUSE, found, hold]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "refused: the process that opened this connection is gone: reconnect" in run.stdout


def _get(conn: socket.socket, path: str) -> bytes:
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
    return conn.recv(65536)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    agent = Agent(tmp_path).start()
    try:
        yield agent
    finally:
        agent.stop()


def test_a_connection_whose_connector_exited_is_told_to_reconnect(agent: Agent) -> None:
    with orphaned_connection(agent.socket) as conn:
        answer = _get(conn, "/v2/systemsharedmemory/status")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"reconnect" in answer
    # A caller on its own connection is served.
    assert agent.request("GET", "/v2/systemsharedmemory/status")[0] == 200


def _cgroups(root: Path, texts: dict[int, str]) -> None:
    for pid, text in texts.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "cgroup").write_text(text)


def test_only_the_kubelets_cgroup_layouts_name_a_pod(tmp_path: Path) -> None:
    sd = UID.replace("-", "_")
    own = f"{'0' * 8}_{sd[9:]}"  # the pod of pid 17, which names another below itself
    _cgroups(
        tmp_path,
        {
            1: f"0::/kubepods/pod{UID}/0123abcd\n",  # cgroupfs, guaranteed
            2: f"12:memory:/kubepods/burstable/pod{UID}/a\n1:cpu:/kubepods/burstable/pod{UID}/a\n",
            3: f"0::/kubepods.slice/kubepods-pod{sd}.slice/cri-containerd-1.scope\n",
            4: f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{sd}.slice\n",
            # Seen from an agent in a cgroup namespace of its own: from an ancestor of its
            # cgroup (the kubelet's), any level of the layout.
            5: f"0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{sd}.slice/c\n",
            6: f"0::/../../kubepods-burstable-pod{sd}.slice/cri-containerd-1.scope\n",
            7: f"0::/../../../pod{UID}/0123abcd\n",
            8: f"0::/../../../besteffort/pod{UID}/0123abcd\n",
            # Not the kubelet's: a user's own systemd scope, a name inside another path,
            # a pod segment at the wrong depth, a mismatched QoS, pods that disagree.
            10: f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/pod{UID}.scope\n",
            11: f"0::/system.slice/kubepods/pod{UID}/x\n",
            12: f"0::/kubepods/burstable/extra/pod{UID}/x\n",
            13: f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{sd}.slice\n",
            14: f"0::/kubepods/pod{UID}x/y\n",
            15: f"1:cpu:/kubepods/pod{UID}/a\n2:memory:/kubepods/pod{UID[:-1]}1/a\n",
            16: f"0::/kubepods.slice/kubepods-pod{UID}.slice/x\n",  # systemd spells it with _
            # ... nor from above the namespace: a pod's own sub-cgroup, a user's scope.
            17: f"0::/../../kubepods-burstable-pod{own}.slice/c/kubepods-pod{sd}.slice\n",
            18: f"0::/../../../user.slice/user-1000.slice/kubepods-pod{sd}.slice\n",
        },
    )
    assert [pod_uid_of(pid, tmp_path) for pid in range(1, 9)] == [UID] * 8
    assert [pod_uid_of(pid, tmp_path) for pid in range(10, 17)] == [None] * 7
    assert [pod_uid_of(pid, tmp_path) for pid in (17, 18)] == [own.replace("_", "-"), None]
    assert pod_uid_of(99, tmp_path) is None  # no such process
