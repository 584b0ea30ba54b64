"""Real clients nobody here wrote: Triton's and KServe's, over REST and gRPC; gRPC errors."""

from __future__ import annotations

import io
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
from support import Agent, declaration, free_port

from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlp_dir: Path, all_types_dir: Path
           ) -> Iterator[tuple[Agent, int, int]]:  # fmt: skip
    agent = Agent(tmp_path_factory.mktemp("clients") / "agent")
    http_port, grpc_port = free_port(), free_port()
    agent.start("--http-port", str(http_port), "--grpc-port", str(grpc_port))
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.declare("types.yaml", declaration("types", all_types_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    agent.wait_state("types", "Warm")
    yield agent, http_port, grpc_port
    agent.stop()


def expected(mlp_dir: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http(served, mlp_dir: Path, binary: bool) -> None:
    _, http_port, _ = served
    client = triton_http.InferenceServerClient(url=f"127.0.0.1:{http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 64]}
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    inp = triton_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton_http.InferRequestedOutput("output", binary_data=binary)
    result = client.infer("mlp", [inp], outputs=[out], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("output"), expected(mlp_dir, x), rtol=1e-5)
    assert result.get_response()["id"] == "r-1"


def _types_inputs(module, datatype: str, array: np.ndarray):  # type: ignore[no-untyped-def]
    inputs = []
    for other in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                  "INT64", "FP16", "FP32", "FP64", "BYTES"):  # fmt: skip
        if other == datatype:
            inp = module.InferInput(f"in_{other}", list(array.shape), other)
            inp.set_data_from_numpy(array)
        else:
            inp = module.InferInput(f"in_{other}", [0, 2], other)
            dtype = np.object_ if other == "BYTES" else triton_http.triton_to_np_dtype(other)
            inp.set_data_from_numpy(np.zeros((0, 2), dtype=dtype))
        inputs.append(inp)
    return inputs


ARRAYS = {
    "BOOL": np.array([[True, False], [False, True]]),
    "UINT8": np.array([[0, 255], [1, 2]], np.uint8),
    "INT64": np.array([[-(2**63), 2**63 - 1], [0, 1]], np.int64),
    "FP16": np.array([[0.5, -1.25], [65504, 0]], np.float16),
    "FP64": np.array([[0.1, -2.5], [1e300, 0]], np.float64),
    "BYTES": np.array([[b"a", "ünï".encode()], [b"", b"zz"]], dtype=np.object_),
}


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_tritonclient_grpc_every_kind_of_tensor(served, datatype: str) -> None:
    _, _, grpc_port = served
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    array = ARRAYS[datatype]
    outputs = [triton_grpc.InferRequestedOutput(f"out_{datatype}")]
    result = client.infer("types", _types_inputs(triton_grpc, datatype, array), outputs=outputs)
    got = result.as_numpy(f"out_{datatype}")
    if datatype == "BYTES":
        assert got.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(got, array)


def test_tritonclient_grpc_over_the_unix_socket(served, mlp_dir: Path) -> None:
    agent, _, _ = served
    socket = agent.socket_dir / "nodecache-grpc.sock"
    assert oct(socket.stat().st_mode & 0o777) == oct(0o660)
    client = triton_grpc.InferenceServerClient(url=f"unix://{socket}")
    assert client.is_server_live()
    meta = client.get_model_metadata("mlp", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx"
    x = np.ones((1, 64), np.float32)
    inp = triton_grpc.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("mlp", [inp])
    np.testing.assert_allclose(result.as_numpy("output"), expected(mlp_dir, x), rtol=1e-5)


def test_grpc_errors_carry_the_right_status(served) -> None:
    _, _, grpc_port = served
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))

    def code_of(request: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        return err.value.code(), err.value.details()

    tensor = pb.ModelInferRequest.InferInputTensor
    assert code_of(pb.ModelInferRequest(model_name="nope"))[0] == grpc.StatusCode.NOT_FOUND
    bad_shape = pb.ModelInferRequest(model_name="mlp", inputs=[tensor(
        name="input", datatype="FP32", shape=[1, 3],
        contents=pb.InferTensorContents(fp32_contents=[1, 2, 3]))])  # fmt: skip
    code, details = code_of(bad_shape)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'input' has shape" in details
    fp16_typed = pb.ModelInferRequest(model_name="types", inputs=[tensor(
        name="in_FP16", datatype="FP16", shape=[1, 2])])  # fmt: skip
    code, details = code_of(fp16_typed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be sent raw" in details
    mismatch = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[b"x"])
    assert code_of(mismatch)[0] == grpc.StatusCode.INVALID_ARGUMENT
    typed = pb.ModelInferRequest(model_name="mlp", inputs=[tensor(
        name="input", datatype="FP32", shape=[1, 64],
        contents=pb.InferTensorContents(fp32_contents=[0.5] * 64))])  # fmt: skip
    response = stub.ModelInfer(typed)
    assert response.outputs[0].name == "output" and len(response.raw_output_contents[0]) == 40
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "nodecache"


def test_kserve_rest_and_grpc_clients(served, mlp_dir: Path) -> None:
    agent, http_port, grpc_port = served
    script = Path(__file__).parent / "kserve_client_check.py"
    done = subprocess.run(
        [sys.executable, str(script), str(http_port), str(grpc_port), str(agent.socket)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    got = np.load(io.BytesIO(done.stdout))
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    np.testing.assert_allclose(got, expected(mlp_dir, x), rtol=1e-5)
