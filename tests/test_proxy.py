"""``nodecache proxy``: a KServe runtime's TCP ports forwarded to a real agent's node socket.

The agent and the proxy run as child processes, as they would in a pod and on its node;
the clients are KServe's and Triton's own, under the InferenceService's name ("fraud-isvc")
while the node knows the model as "mlp".
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from support import ROOT, Agent, declaration, free_port, kill_tree, wait_for

from nodecache.agent.proxy.names import Names, field_one, replace_field_one
from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc

ISVC = "fraud-isvc"
TYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
         "FP16", "FP32", "FP64", "BYTES")  # fmt: skip


class Proxy:
    """``nodecache proxy`` in a child process."""

    def __init__(self, socket_dir: Path, log: Path, *extra: str, model: str = "mlp") -> None:
        self.http, self.grpc = free_port(), free_port()
        command = [
            sys.executable, "-m", "nodecache.agent.cli", "proxy",
            "--model", model, "--served-name", ISVC,
            "--listen", f"127.0.0.1:{self.http}", "--grpc-listen", f"127.0.0.1:{self.grpc}",
            "--socket-dir", str(socket_dir), *extra,
        ]  # fmt: skip
        out = log.open("ab")
        self.log = log
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out)
        wait_for(self._listening, timeout=60, what="the proxy's port")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.http), timeout=1).close()
            return True
        except OSError:
            return False

    def exchange(self, raw: bytes, *, answers: int = 1, heads: tuple[int, ...] = ()
                 ) -> list[tuple[int, dict[str, str], bytes]]:  # fmt: skip
        """Raw bytes out, parsed answers back: for what no well-behaved client sends.
        ``heads``: which answers are to HEAD requests (no body follows)."""
        with socket.create_connection(("127.0.0.1", self.http), timeout=10) as conn:
            conn.sendall(raw)
            return _read_answers(conn, answers, heads)

    def get(self, path: str, body: bytes | None = None, **headers: str):  # type: ignore[no-untyped-def]
        method = "GET" if body is None else "POST"
        lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body or b'')}"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        (answer,) = self.exchange(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return answer

    def stop(self) -> None:
        kill_tree(self.proc)


def _read_answers(conn: socket.socket, count: int, heads: tuple[int, ...] = ()
                  ) -> list[tuple[int, dict[str, str], bytes]]:  # fmt: skip
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return answers
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = 0 if len(answers) in heads else int(headers.get("content-length", "0"))
        while len(data) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        answers.append((int(status_line.split()[1]), headers, data[:length]))
        data = data[length:]
    return answers


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, mlp_dir: Path, all_types_dir: Path
         ) -> Iterator[Agent]:  # fmt: skip
    agent = Agent(tmp_path_factory.mktemp("proxy") / "agent")
    agent.start()
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.declare("types.yaml", declaration("types", all_types_dir.as_uri()))
    agent.declare("gone.yaml", declaration("gone", (mlp_dir / "missing").as_uri()))
    agent.wait_state("mlp", "Warm")
    agent.wait_state("types", "Warm")
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def proxy(node: Agent) -> Iterator[Proxy]:
    running = Proxy(node.socket_dir, node.home / "proxy.log", "--max-body", "8Mi")
    yield running
    running.stop()


def expected(mlp_dir: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]


def test_kserve_clients_rest_v1_v2_and_grpc_through_the_proxy(proxy: Proxy, mlp_dir: Path
                                                              ) -> None:  # fmt: skip
    script = Path(__file__).parent / "kserve_client_check.py"
    done = subprocess.run(
        [sys.executable, str(script), str(proxy.http), str(proxy.grpc), "-", ISVC],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    got = np.load(io.BytesIO(done.stdout))
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    np.testing.assert_allclose(got, expected(mlp_dir, x), rtol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_sees_the_isvc_name(proxy: Proxy, mlp_dir: Path, binary: bool) -> None:
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{proxy.http}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(ISVC)
    assert client.get_model_metadata(ISVC)["name"] == ISVC
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    inp = triton_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton_http.InferRequestedOutput("output", binary_data=binary)
    result = client.infer(ISVC, [inp], outputs=[out], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("output"), expected(mlp_dir, x), rtol=1e-5)
    assert result.get_response()["model_name"] == ISVC
    assert result.get_response()["id"] == "r-1"


def test_tritonclient_grpc_sees_the_isvc_name(proxy: Proxy, mlp_dir: Path) -> None:
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{proxy.grpc}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(ISVC)
    assert client.get_model_metadata(ISVC, as_json=True)["name"] == ISVC
    x = np.ones((1, 64), np.float32)
    inp = triton_grpc.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(ISVC, [inp])
    np.testing.assert_allclose(result.as_numpy("output"), expected(mlp_dir, x), rtol=1e-5)
    assert result.get_response().model_name == ISVC


def test_tritons_configuration_and_statistics_through_the_proxy(proxy: Proxy) -> None:
    """What perf_analyzer asks before it sends load, under the isvc's name, both ways."""
    http = triton_http.InferenceServerClient(url=f"127.0.0.1:{proxy.http}")
    grpc_client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{proxy.grpc}")
    inp = triton_http.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.ones((1, 64), np.float32))
    before = http.get_inference_statistics(ISVC)["model_stats"][0]["inference_stats"]
    http.infer(ISVC, [inp])

    for config in (
        http.get_model_config(ISVC),
        grpc_client.get_model_config(ISVC, as_json=True)["config"],
    ):
        assert config["name"] == ISVC and config["platform"] == "onnxruntime_onnx"
        assert [i["name"] for i in config["input"]] == ["input"]
    for stats in (
        http.get_inference_statistics(ISVC),
        grpc_client.get_inference_statistics(ISVC, as_json=True),
    ):
        (entry,) = stats["model_stats"]
        assert entry["name"] == ISVC
        done = int(entry["inference_stats"]["success"]["count"])
        assert done == int(before["success"]["count"]) + 1
    with pytest.raises(Exception, match="not served here"):
        grpc_client.get_model_config("other")


def test_shared_memory_is_refused_through_the_proxy(proxy: Proxy) -> None:
    """Regions are scoped to the calling pod; through the proxy that is the predictor pod,
    so a network client naming a region would use memory its other containers registered."""
    http = triton_http.InferenceServerClient(url=f"127.0.0.1:{proxy.http}")
    grpc_client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{proxy.grpc}")
    http_input = triton_http.InferInput("input", [1, 64], "FP32")
    http_input.set_shared_memory("sidecar-region", 256)
    with pytest.raises(Exception, match="shared memory is not available through the proxy"):
        http.infer(ISVC, [http_input])
    grpc_input = triton_grpc.InferInput("input", [1, 64], "FP32")
    grpc_input.set_shared_memory("sidecar-region", 256)
    with pytest.raises(Exception, match="shared memory is not available through the proxy"):
        grpc_client.infer(ISVC, [grpc_input])
    status, _, _ = proxy.get("/v2/systemsharedmemory/region/r/register", b"{}")
    assert status == 404


def test_large_tensors_cross_both_ways_intact(node: Agent, tmp_path: Path) -> None:
    """An identity model, 4 MiB in and out, binary over REST and raw over gRPC."""
    types = Proxy(node.socket_dir, tmp_path / "types.log", model="types")
    try:
        array = np.random.default_rng(3).standard_normal((1 << 19, 2))  # FP64: 8 MiB
        for module, port in ((triton_http, types.http), (triton_grpc, types.grpc)):
            client = module.InferenceServerClient(url=f"127.0.0.1:{port}")
            inputs = []
            for kind in TYPES:
                inp = module.InferInput(f"in_{kind}", list(array.shape) if kind == "FP64"
                                        else [0, 2], kind)  # fmt: skip
                dtype = np.object_ if kind == "BYTES" else triton_http.triton_to_np_dtype(kind)
                inp.set_data_from_numpy(array if kind == "FP64" else np.zeros((0, 2), dtype))
                inputs.append(inp)
            outputs = [module.InferRequestedOutput("out_FP64")]
            result = client.infer(ISVC, inputs, outputs=outputs)
            np.testing.assert_array_equal(result.as_numpy("out_FP64"), array)
    finally:
        types.stop()


def test_other_model_names_are_not_served(proxy: Proxy) -> None:
    status, _, body = proxy.get("/v2/models/mlp/infer", b"{}")
    assert status == 404 and "not served here" in json.loads(body)["error"]
    assert proxy.get("/v2/models/types")[0] == 404
    assert proxy.get("/v2/repository/index", b"")[0] == 404
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{proxy.grpc}"))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name="types"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=ISVC))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stub.ModelReady(pb.ModelReadyRequest(name=ISVC)).ready


def test_client_mistakes_get_4xx_with_an_oip_body(proxy: Proxy) -> None:
    def error(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
        status, headers, body = answer
        assert headers["content-type"].startswith("application/json")
        return status, json.loads(body)["error"]

    assert error(proxy.get(f"/v2/models/{ISVC}/infer", b"{not json"))[0] == 400  # the node's
    assert error(proxy.exchange(b"GARBAGE\r\n\r\n")[0])[0] == 400
    assert error(proxy.exchange(b"PUT /v2 HTTP/1.1\r\nContent-Length: 0\r\n\r\n")[0])[0] == 405
    big = f"POST /v2/models/{ISVC}/infer HTTP/1.1\r\nContent-Length: {9 << 20}\r\n\r\n"
    status, message = error(proxy.exchange(big.encode())[0])
    assert status == 413 and "limit" in message
    huge_head = b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * (80 << 10) + b"\r\n\r\n"
    assert error(proxy.exchange(huge_head)[0])[0] == 431
    control = f"GET /v2/models/{ISVC}%0d%0aX:%20y HTTP/1.1\r\n\r\n".encode()
    assert proxy.exchange(control)[0][0] == 404  # decoded, it names no model served here
    upgrade = b"GET /v2 HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    assert proxy.exchange(upgrade)[0][0] in (200, 400)  # answered, never switched
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{proxy.grpc}"))
    bad = grpc.insecure_channel(f"127.0.0.1:{proxy.grpc}").unary_unary(
        "/inference.GRPCInferenceService/ModelInfer"
    )
    with pytest.raises(grpc.RpcError) as err:
        bad(b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end of the message
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # the node's own check, relayed
        stub.ModelInfer(pb.ModelInferRequest(model_name=ISVC, raw_input_contents=[b"x"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_keep_alive_pipelining_head_and_expect(proxy: Proxy) -> None:
    one = f"GET /v2/models/{ISVC}/ready HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    head = f"HEAD /v2/models/{ISVC} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answers = proxy.exchange(one + head + one, answers=3, heads=(1,))
    assert [a[0] for a in answers] == [200, 200, 200]
    assert json.loads(answers[0][2]) == {"name": ISVC, "ready": True} == json.loads(answers[2][2])
    assert int(answers[1][1]["content-length"]) > 0 and answers[1][2] == b""  # HEAD: no body
    body = json.dumps({"instances": [[0.0] * 64]}).encode()
    expect = (f"POST /v1/models/{ISVC}:predict HTTP/1.1\r\nExpect: 100-continue\r\n"
              f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", proxy.http), timeout=10) as conn:
        conn.sendall(expect)
        assert conn.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.sendall(body)
        ((status, _, answer),) = _read_answers(conn, 1)
    assert status == 200 and len(json.loads(answer)["predictions"][0]) == 10


def test_chunked_request_bodies_are_relayed(proxy: Proxy) -> None:
    body = json.dumps({"instances": [[0.0] * 64]}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    raw = f"POST /v1/models/{ISVC}:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    ((status, _, answer),) = proxy.exchange(raw.encode() + chunks)
    assert status == 200 and "predictions" in json.loads(answer)


def test_readiness_follows_the_model_on_the_node(node: Agent, tmp_path: Path) -> None:
    """A model that cannot be fetched: the proxy is live but not ready, saying why."""
    broken = Proxy(node.socket_dir, tmp_path / "broken.log", model="gone")
    try:
        assert broken.get("/v2/health/live")[0] == 200
        status, _, body = broken.get("/v2/health/ready")
        assert status == 503 and "'gone' is not ready" in json.loads(body)["error"]
        client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{broken.grpc}")
        assert client.is_server_live() and not client.is_server_ready()
    finally:
        broken.stop()


def test_no_node_socket_is_503_with_retry_after(tmp_path: Path) -> None:
    empty = tmp_path / "run"
    empty.mkdir()
    alone = Proxy(empty, tmp_path / "alone.log")
    try:
        assert alone.get("/v2/health/live")[0] == 200
        for path, body in (("/v2/health/ready", None), (f"/v2/models/{ISVC}/infer", b"{}")):
            status, headers, answer = alone.get(path, body)
            assert status == 503 and headers["retry-after"] == "1"
            assert "does not answer" in json.loads(answer)["error"]
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{alone.grpc}"))
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name=ISVC), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        alone.stop()


def test_the_proxy_survives_an_agent_restart(tmp_path: Path, mlp_dir: Path) -> None:
    """Pooled connections to an agent that restarted are dropped and made again."""
    agent = Agent(tmp_path / "agent")
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.start()
    proxy = Proxy(agent.socket_dir, tmp_path / "proxy.log")
    body = json.dumps({"instances": [[0.0] * 64]}).encode()
    try:
        agent.wait_state("mlp", "Warm")
        client = triton_http.InferenceServerClient(url=f"127.0.0.1:{proxy.http}")
        assert client.is_model_ready(ISVC)
        agent.stop()
        assert proxy.get("/v2/health/ready")[0] == 503
        agent.start()
        agent.wait_state("mlp", "Warm")
        assert client.is_model_ready(ISVC)
        assert proxy.get(f"/v1/models/{ISVC}:predict", body)[0] == 200
    finally:
        proxy.stop()
        if agent.proc is not None:
            kill_tree(agent.proc)


# -- the renaming itself, byte for byte --------------------------------------------------


def test_protobuf_name_splice_keeps_every_other_byte() -> None:
    request = pb.ModelInferRequest(
        model_name="fraud-isvc", id="r", raw_input_contents=[b"\n" * 300]
    )
    data = request.SerializeToString()
    renamed = replace_field_one(data, field_one(data), "mlp")
    parsed = pb.ModelInferRequest.FromString(renamed)
    assert parsed.model_name == "mlp" and parsed.id == "r"
    assert parsed.raw_input_contents == request.raw_input_contents
    unnamed = pb.ModelInferRequest(id="q").SerializeToString()
    assert pb.ModelInferRequest.FromString(replace_field_one(unnamed, None, "m")).model_name == "m"


def test_json_answers_are_renamed_only_where_they_name_the_model() -> None:
    names = Names("fraud-isvc", "mlp")
    parts = names.rename_json("model_name", b'{"model_name":"mlp","outputs":[]}')
    assert parts is not None and b"".join(parts) == b'{"model_name":"fraud-isvc","outputs":[]}'
    parts = names.rename_json("name", b'{"ready": true, "name": "mlp"}')
    assert parts is not None and json.loads(b"".join(parts))["name"] == "fraud-isvc"
    assert names.rename_json("name", b'{"name":"mlpx"}') is None
    assert names.route("/v2/models/fraud%2Disvc/versions/1/infer", "?a=b").target == (
        "/v2/models/mlp/versions/1/infer?a=b"
    )


# -- the KServe runtime and InferenceService examples ------------------------------------


def test_the_kserve_runtime_runs_the_proxy_as_the_cli_accepts_it() -> None:
    """The ServingRuntime's args with {{.Name}} filled in and the isvc's args appended (as
    KServe does) parse; the socket folder is the CSI socket volume; the probes ask the
    proxy's own health routes."""
    import yaml

    from nodecache.agent.cli import build_parser
    from nodecache.agent.settings import ProxySettings, from_arguments

    folder = ROOT / "daemonset" / "examples" / "kserve"
    (runtime,) = yaml.safe_load_all((folder / "clusterservingruntime.yaml").read_text())
    (isvc,) = yaml.safe_load_all((folder / "inferenceservice.yaml").read_text())
    assert runtime["metadata"]["name"] == isvc["spec"]["predictor"]["model"]["runtime"]
    (container,) = runtime["spec"]["containers"]
    name = isvc["metadata"]["name"]
    args = [a.replace("{{.Name}}", name) for a in container["args"]]
    args += isvc["spec"]["predictor"]["model"]["args"]
    settings = from_arguments(ProxySettings, build_parser().parse_args(args))
    assert (settings.served_name, settings.model) == (name, "resnet50")
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in runtime["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["csi"] == {"driver": "csi.nodecache.io", "readOnly": True,
                             "volumeAttributes": {"socket": "true"}}  # fmt: skip
    assert str(settings.socket_dir) == mount["mountPath"]
    assert settings.listen[1] == container["ports"][0]["containerPort"]
    names = Names(name, "resnet50")
    assert names.route(container["livenessProbe"]["httpGet"]["path"], "").kind == "live"
    assert names.route(container["readinessProbe"]["httpGet"]["path"], "").kind == "ready"
