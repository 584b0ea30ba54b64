"""The routed path (``--workers``) as a hostile pod sees it: nothing a caller sends reaches a
worker's control API, swaps answers between callers, or hangs a worker."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from support import Agent, declaration, free_port, wait_for

from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc

INJECTED = (
    "1/infer HTTP/1.1\r\nHost: w\r\nContent-Length: 0\r\n\r\n"
    "PUT /nodecache/v1/worker/models/evil HTTP/1.1\r\nHost: w\r\n"
    'Content-Length: 40\r\n\r\n{"path": "/tmp", "format": "python"}    '
)


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, mlp_dir: Path) -> Iterator[Agent]:
    agent = Agent(tmp_path_factory.mktemp("routed") / "agent")
    agent.start("--workers", "1", "--spread-at", "0", "--max-output-bytes", "128Ki")
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    yield agent
    agent.stop()


def body_for(x: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                       "data": x.ravel().tolist()}]}  # fmt: skip
    return json.dumps(doc).encode()


def expected(mlp_dir: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]


def raw_exchange(path: Path, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Write raw bytes to the node socket; read until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def answer_of(agent: Agent, mlp_dir: Path, seed: int) -> None:
    """A well-formed request from a fresh client gets its own right answer."""
    x = np.random.default_rng(seed).standard_normal((2, 64)).astype(np.float32)
    status, doc = agent.request("POST", "/v2/models/mlp/infer", json.loads(body_for(x)))
    assert status == 200, doc
    got = np.array(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    np.testing.assert_allclose(got, expected(mlp_dir, x), rtol=1e-5)


def model_names(agent: Agent) -> set[str]:
    return {m["name"] for m in agent.status()["models"]}


def test_a_grpc_version_cannot_smuggle_requests_to_the_worker(routed: Agent, mlp_dir: Path) -> None:
    channel = grpc.insecure_channel(f"unix:{routed.socket_dir / 'nodecache-grpc.sock'}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    x = np.ones((1, 64), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
    for version, code in [
        (INJECTED, grpc.StatusCode.INVALID_ARGUMENT),
        ("1 HTTP/1.1", grpc.StatusCode.INVALID_ARGUMENT),
        ("välue", grpc.StatusCode.INVALID_ARGUMENT),
        ("2", grpc.StatusCode.NOT_FOUND),
    ]:
        request = pb.ModelInferRequest(
            model_name="mlp", model_version=version, inputs=[tensor],
            raw_input_contents=[x.tobytes()],
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
        assert caught.value.code() == code, (version, caught.value)
        for call in (stub.ModelMetadata, stub.ModelReady):
            with pytest.raises(grpc.RpcError) as caught:
                if call is stub.ModelMetadata:
                    call(pb.ModelMetadataRequest(name="mlp", version=version), timeout=10)
                else:
                    call(pb.ModelReadyRequest(name="mlp", version=version), timeout=10)
            assert caught.value.code() == code, (version, caught.value)
    channel.close()
    assert model_names(routed) == {"mlp"}
    answer_of(routed, mlp_dir, 1)


def test_rest_paths_cannot_reach_the_control_api(routed: Agent, mlp_dir: Path) -> None:
    for path in [
        "/v2/models/mlp/../../../nodecache/v1/worker/status",
        "/v2/models/mlp/versions/1%0D%0AHost:%20x/infer",
        "/v2/models/mlp%0D%0A/infer",
    ]:
        status, _, data = routed_raw(routed, "POST", path, b"{}")
        assert 400 <= status < 500, (path, status, data)
        assert "error" in json.loads(data)
    assert model_names(routed) == {"mlp"}
    answer_of(routed, mlp_dir, 2)


def routed_raw(
    agent: Agent, method: str, path: str, body: bytes, extra: bytes = b""
) -> tuple[int, bytes, bytes]:
    """One request with the target written exactly as given; (status, head, body)."""
    head = (
        (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )
    answer = raw_exchange(agent.socket, head + body)
    top, _, payload = answer.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), top, payload


def test_expect_100_continue_never_swaps_answers(routed: Agent, mlp_dir: Path) -> None:
    """curl sends ``Expect: 100-continue`` for bodies over 1 MiB; every caller still gets
    the answer to its own request, and so do the callers after it."""
    big = np.random.default_rng(3).standard_normal((2200, 64)).astype(np.float32)
    body = body_for(big)
    assert len(body) > 1 << 20
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(routed.socket))
            s.sendall(
                b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            interim = s.recv(4096)
            assert interim.startswith(b"HTTP/1.1 100"), interim
            s.sendall(body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += s.recv(65536)
            head, _, payload = answer.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))  # fmt: skip
            while len(payload) < length:
                payload += s.recv(1 << 20)
        assert head.startswith(b"HTTP/1.1 200"), head
        doc = json.loads(payload)
        got = np.array(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected(mlp_dir, big), rtol=1e-5)
        answer_of(routed, mlp_dir, 4)


def test_head_requests_answer_and_never_use_up_the_worker(routed: Agent, mlp_dir: Path) -> None:
    socks = []
    for _ in range(300):  # more than the relay's connections to one worker
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(routed.socket))
        s.sendall(b"HEAD /v2/models/mlp HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)  # abandoned: never read, never closed until the end
    s = socks[0]
    s.settimeout(10)
    head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head
    answer_of(routed, mlp_dir, 5)
    for s in socks:
        s.close()


def test_router_errors_are_oip_bodies_and_v1_is_routed(routed: Agent, mlp_dir: Path) -> None:
    status, doc = routed.request("GET", "/v2/no/such/route")
    assert status == 404 and "error" in doc
    status, doc = routed.request("DELETE", "/v2/models/mlp")
    assert status == 405 and "error" in doc
    # A header that is not Latin-1 on the way in: a 4xx or ignored, never a plain-text 500.
    status, _, data = routed_raw(
        routed, "GET", "/v2/models/mlp", b"", extra="Accept: ✓\r\nX-Note: ✓\r\n".encode()
    )
    assert status == 200 or (status < 500 and "error" in json.loads(data)), (status, data)
    status, doc = routed.request("GET", "/v1/models/mlp")
    assert status == 200 and doc["ready"] is True
    x = np.random.default_rng(6).standard_normal((2, 64)).astype(np.float32)
    status, doc = routed.request("POST", "/v1/models/mlp:predict", {"instances": x.tolist()})
    assert status == 200, doc
    np.testing.assert_allclose(np.array(doc["predictions"]), expected(mlp_dir, x), rtol=1e-5)


def test_workers_ignore_the_working_directory(tmp_path: Path, mlp_dir: Path) -> None:
    """A folder named like our package where the agent starts cannot replace the worker."""
    planted = tmp_path / "cwd" / "serve"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (planted / "worker.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    agent = Agent(tmp_path / "agent")
    # The console script, as installed: unlike ``python -m``, it never puts the working
    # directory on the agent's own sys.path.
    command = [
        str(Path(sys.executable).with_name("nodecache")), "agent",
        "--declarations", str(agent.declarations), "--cache-dir", str(agent.cache_dir),
        "--socket-dir", str(agent.socket_dir), "--metrics-port", "0", "--workers", "1",
    ]  # fmt: skip
    with agent.log.open("ab") as log:
        agent.proc = subprocess.Popen(command, cwd=tmp_path / "cwd", stdout=log, stderr=log)
    try:
        wait_for(agent._answers, timeout=60, what="the agent socket")
        agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
        agent.wait_state("mlp", "Warm")
        answer_of(agent, mlp_dir, 7)
        assert not marker.exists()
    finally:
        agent.stop()


def test_a_hung_head_does_not_delay_shutdown(tmp_path: Path, mlp_dir: Path) -> None:
    agent = Agent(tmp_path / "agent")
    agent.start("--workers", "1", "--metrics-port", str(free_port()))
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.socket))
        s.sendall(b"HEAD /v2/models/mlp HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        # With the connection still open: nothing waits for a body a HEAD never gets, so
        # the agent does not sit out its 30 s drain (the wait below would time out).
        assert agent.stop(signal.SIGTERM, timeout=20) == 0


def test_the_output_limit_holds_in_the_worker(routed: Agent, mlp_dir: Path) -> None:
    x = np.zeros((4000, 64), np.float32)  # 4000 x 10 FP32 out: 160,000 bytes > 128 KiB
    status, doc = routed.request("POST", "/v2/models/mlp/infer", json.loads(body_for(x)))
    assert status == 400 and "131072" in doc["error"], doc
    answer_of(routed, mlp_dir, 8)
