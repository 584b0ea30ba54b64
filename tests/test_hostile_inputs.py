"""What a hostile (or careless) client can send to the in-process serving path: each case
answers a 4xx with a short OIP error, costs bounded memory and time, and never stalls the
event loop, leaks metric series, or shows an internal path (issue 12)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.errors import InvalidInput
from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc
from nodecache.serve.grpc.server import GrpcServer
from nodecache.serve.http import NodeServer, build_app
from nodecache.serve.metrics import UNKNOWN_MODEL
from nodecache.serve.protocol import InferRequest
from nodecache.serve.repository import ModelRepository
from nodecache.serve.tensors import decode_tensor

# -- small real models -----------------------------------------------------------------


def _save(graph: Any, folder: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def _one_node(folder: Path, op: str, inputs: dict[str, Any], out: Any, **kw: Any) -> Path:
    """A one-node graph: ``inputs`` name -> (element type, shape); output ``out``."""
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, list(inputs), ["out"], **kw)],
        op.lower(),
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info("out", *out)],
        initializer=kw.pop("initializer", None) or [],
    )
    return _save(graph, folder)


def build_models(root: Path) -> dict[str, Path]:
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    table = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "table")
    gather = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", T.INT64, ["n"])],
        [helper.make_tensor_value_info("out", T.FLOAT, ["n", 2])],
        initializer=[table],
    )
    one = helper.make_tensor("one", T.FLOAT, [1], [1.0])
    return {
        "gather": _save(gather, root / "gather"),
        "add": _one_node(
            root / "add", "Add", {"a": (T.FLOAT, ["n"]), "b": (T.FLOAT, ["m"])}, (T.FLOAT, ["k"])
        ),
        "fill": _one_node(
            root / "fill", "ConstantOfShape", {"shape": (T.INT64, [1])}, (T.FLOAT, ["n"]), value=one
        ),
        "recip": _one_node(root / "recip", "Reciprocal", {"x": (T.FLOAT, ["n"])}, (T.FLOAT, ["n"])),
        "bytes8": _one_node(root / "bytes8", "Identity", {"x": (T.UINT8, ["n"])}, (T.UINT8, ["n"])),
        "text": _one_node(root / "text", "Identity", {"x": (T.STRING, ["n"])}, (T.STRING, ["n"])),
    }


BOOM_PY = """
import numpy as np
from nodecache.serve import Model

class Boom(Model):
    def predict(self, data):
        raise RuntimeError("boom in /opt/secret/site-packages/thing.py line 3")
"""

# A small limit on answers, so the output-size case needs no 64 MiB answer.
OUTPUT_LIMIT = 1 << 20


# -- one in-process node: REST and gRPC on Unix sockets --------------------------------


@dataclass
class Node:
    http: aiohttp.ClientSession
    grpc: pb_grpc.GRPCInferenceServiceStub
    repository: ModelRepository
    socket: Path

    async def call(
        self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:  # fmt: skip
        payload = data if data is not None else (None if body is None else json.dumps(body))
        async with self.http.request(method, path, data=payload, headers=headers) as resp:
            raw = await resp.read()
            assert resp.headers["Content-Type"].startswith("application/json"), raw[:200]
            return resp.status, strict_json(raw)

    async def grpc_error(self, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(self.grpc, rpc)(request)
        return err.value.code(), err.value.details() or ""


def strict_json(raw: bytes) -> Any:
    """RFC 8259 JSON only: Python's json would take NaN and Infinity."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(raw, parse_constant=refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    found = build_models(root)
    (root / "boom").mkdir()
    (root / "boom" / "model.py").write_text(BOOM_PY)
    found["boom"] = root / "boom"
    return found


@pytest.fixture
async def node(tmp_path: Path, mlp_dir: Path, models: dict[str, Path]) -> AsyncIterator[Node]:
    repository = ModelRepository(max_inflight_per_model=64)
    repository.register("mlp", mlp_dir, "onnx")
    for name, folder in models.items():
        if name == "boom":
            repository.register(name, folder, "python", entrypoint="model:Boom")
        else:
            repository.register(name, folder, "onnx")
    dataplane = DataPlane(repository, max_output_bytes=OUTPUT_LIMIT)
    http = NodeServer(build_app(dataplane, max_body=32 << 20), tmp_path / "n.sock")
    rpc = GrpcServer(dataplane, tmp_path / "g.sock")
    await http.start()
    await rpc.start()
    channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'g.sock'}")
    connector = aiohttp.UnixConnector(path=str(http.socket_path))
    try:
        async with aiohttp.ClientSession("http://localhost", connector=connector) as session:
            yield Node(session, pb_grpc.GRPCInferenceServiceStub(channel), repository, tmp_path)
    finally:
        await channel.close()
        await rpc.stop(1)
        await http.stop()


def tensor(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def grpc_infer(model: str, name: str, datatype: str, array: np.ndarray, version: str = ""
               ) -> pb.ModelInferRequest:  # fmt: skip
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=list(array.shape))],
        raw_input_contents=[array.tobytes()],
    )  # fmt: skip


def no_internals(message: str) -> None:
    assert "/onnxruntime_src" not in message and "Traceback" not in message, message
    assert ".cc:" not in message and ".h:" not in message and ".py" not in message, message
    assert len(message) < 500, message


# -- 1. metric series ------------------------------------------------------------------


def _series_of(model: str) -> list[str]:
    text = generate_latest(REGISTRY).decode()
    return [line for line in text.splitlines() if f'model="{model}"' in line]


async def test_unknown_model_names_share_one_metric_label(node: Node) -> None:
    before = REGISTRY.get_sample_value(
        "nodecache_requests_total",
        {"model": UNKNOWN_MODEL, "version": "", "protocol": "rest", "code": "404"},
    ) or 0.0  # fmt: skip
    body = {"inputs": [tensor("input", "FP32", [0.0])]}
    names = [f"made-up-{i}-" + "x" * 200 for i in range(50)]
    for name in names:
        assert (await node.call("POST", f"/v2/models/{name}/infer", body))[0] == 404
        assert (
            await node.grpc_error(
                "ModelInfer", grpc_infer(name, "x", "FP32", np.zeros(1, np.float32))
            )
        )[0] == grpc.StatusCode.NOT_FOUND
    text = generate_latest(REGISTRY).decode()
    assert not any(name in text for name in names)
    after = REGISTRY.get_sample_value(
        "nodecache_requests_total",
        {"model": UNKNOWN_MODEL, "version": "", "protocol": "rest", "code": "404"},
    )  # fmt: skip
    assert after == before + len(names)


async def test_a_removed_model_leaves_no_series(node: Node) -> None:
    body = {"inputs": [tensor("input", "FP32", [0.0] * 64, [1, 64])]}
    assert (await node.call("POST", "/v2/models/mlp/infer", body))[0] == 200
    assert _series_of("mlp")  # requests, durations, queue, inference, loads, bytes
    await node.repository.unregister("mlp")
    assert _series_of("mlp") == []
    assert (await node.call("POST", "/v2/models/mlp/infer", body))[0] == 404
    assert _series_of("mlp") == []


# -- 2. heavy decoding off the event loop ----------------------------------------------


def _raw_http(socket_path: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_liveness_answers_while_millions_of_bytes_elements_decode(node: Node) -> None:
    """Millions of empty BYTES elements (the last one broken, so the request fails only
    once all are read): while they decode, /v2/health/live still answers."""
    count = 4_000_000
    raw = b"\0\0\0\0" * (count - 1) + struct.pack("<I", 1000)
    spec = {"name": "x", "datatype": "BYTES", "shape": [count]}
    spec["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [spec]}).encode()
    big = (
        b"POST /v2/models/text/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(header), len(header) + len(raw))
    ) + header + raw  # fmt: skip
    sent, answered = threading.Event(), threading.Event()

    def send_big() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(node.socket / "n.sock"))
            sock.sendall(big)
            sent.set()
            answer = sock.makefile("rb").read()
        answered.set()
        return answer

    big_task = asyncio.ensure_future(asyncio.to_thread(send_big))
    while not sent.is_set():
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # the server has the whole body and is decoding it
    live = await asyncio.to_thread(
        _raw_http, node.socket / "n.sock",
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    assert live.startswith(b"HTTP/1.1 200") and not answered.is_set()
    answer = await big_task
    assert answer.startswith(b"HTTP/1.1 400") and b"overruns" in answer


@pytest.mark.parametrize(
    ("shape", "raw", "needle"),
    [
        ([1000], b"\0" * 400, "too few for 1000 BYTES elements"),  # refused before allocating
        ([1], b"\0\0\0\0" * 2, "more than the 1 BYTES elements"),
        ([2], b"\0\0\0\0" + b"\xff\xff\xff\xff", "overruns"),
        ([2], b"\1\0\0\0a\0\0\0", "truncated"),
    ],
)
def test_binary_bytes_decode_only_what_the_shape_declares(
    shape: list[int], raw: bytes, needle: str
) -> None:
    with pytest.raises(InvalidInput, match=needle):
        decode_tensor({"name": "x", "datatype": "BYTES", "shape": shape}, raw)
    two = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert decode_tensor({"name": "x", "datatype": "BYTES", "shape": [2]}, two)[1].tolist() == [
        b"ab",
        b"",
    ]


WHERE_PY = """
import threading
import numpy as np
from nodecache.serve import Model

class Where(Model):
    threads = []

    def predict(self, data):
        self.threads.append(threading.current_thread() is threading.main_thread())
        return {"y": np.zeros(1, np.float32)}
"""


async def test_a_quick_model_runs_large_inputs_off_the_event_loop(tmp_path: Path) -> None:
    """Small calls of a quick model run on the loop (cheaper than a thread hop); a large
    input never does, however quick the model usually is."""
    (tmp_path / "where").mkdir()
    (tmp_path / "where" / "model.py").write_text(WHERE_PY)
    repo = ModelRepository()
    repo.register("where", tmp_path / "where", "python", entrypoint="model:Where")
    plane = DataPlane(repo)
    await repo.load("where")
    model = repo.get("where")
    assert model is not None and model.runtime is not None
    for size in (4, 1 << 20, 4):
        model.typical_predict = 1e-5  # known to be quick (on a busy machine it may not)
        await plane.infer("where", InferRequest(inputs={"x": np.zeros(size, np.float32)}))
    assert model.runtime.model.threads == [True, False, True]  # type: ignore[attr-defined]


# -- 3. runtime errors the client caused -----------------------------------------------


RUNTIME_FAULTS = [
    ("gather", [tensor("idx", "INT64", [10])], "out of data bounds"),
    ("add", [tensor("a", "FP32", [1.0, 2.0]), tensor("b", "FP32", [1.0, 2.0, 3.0])], "Add"),
    ("fill", [tensor("shape", "INT64", [-5])], "ConstantOfShape"),
]


@pytest.mark.parametrize(("model", "inputs", "needle"), RUNTIME_FAULTS)
async def test_runtime_errors_a_client_caused_are_400_without_paths(
    node: Node, model: str, inputs: list[dict], needle: str
) -> None:
    code, err = await node.call("POST", f"/v2/models/{model}/infer", {"inputs": inputs})
    assert code == 400 and needle in err["error"], err
    no_internals(err["error"])
    request = pb.ModelInferRequest(model_name=model)
    for spec in inputs:
        array = np.array(spec["data"], np.float32 if spec["datatype"] == "FP32" else np.int64)
        request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=[array.size])
        request.raw_input_contents.append(array.tobytes())
    code, details = await node.grpc_error("ModelInfer", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details
    no_internals(details)


async def test_our_own_faults_are_a_generic_500(node: Node) -> None:
    code, err = await node.call("POST", "/v2/models/boom/infer",
                                {"inputs": [tensor("x", "FP32", [1.0])]})  # fmt: skip
    assert (code, err) == (500, {"error": "internal error"})
    code, details = await node.grpc_error(
        "ModelInfer", grpc_infer("boom", "x", "FP32", np.ones(1, np.float32))
    )
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")


@pytest.mark.parametrize("name", ["ü-model", "a\r\nb", "x" * 5000, "../../etc"])
async def test_odd_model_names_on_grpc_are_not_found(node: Node, name: str) -> None:
    for rpc, request in (
        ("ModelInfer", grpc_infer(name, "x", "FP32", np.ones(1, np.float32))),
        ("ModelMetadata", pb.ModelMetadataRequest(name=name)),
        ("ModelReady", pb.ModelReadyRequest(name=name)),
    ):
        code, details = await node.grpc_error(rpc, request)
        assert code == grpc.StatusCode.NOT_FOUND and len(details) < 200, (rpc, code)


# -- 4. lax numbers and JSON that is not JSON ------------------------------------------


V1_REFUSED = [
    ("gather", b'{"instances": ' + b"[" * 3000 + b"]" * 3000 + b"}", "JSON"),
    ("gather", b'{"instances": [1' + b"0" * 5000 + b"]}", "JSON"),
    ("gather", b'{"instances": [1' + b"0" * 30 + b"]}", "integers"),
    ("gather", b'{"instances": [1.7]}', "integers"),
    ("gather", b'{"instances": [true]}', "integers"),
    ("gather", b'{"instances": [1, true]}', "integers"),
    ("bytes8", b'{"instances": [300]}', "out of range for UINT8"),
    ("recip", b'{"instances": [1e39]}', "out of range for FP32"),
    ("recip", b'{"instances": ["1.5"]}', "numbers"),
    ("recip", b'{"instances": [[1.0], [2.0, 3.0]]}', "rectangular"),
]


@pytest.mark.parametrize(("model", "body", "needle"), V1_REFUSED)
async def test_v1_refuses_what_it_would_have_to_bend(
    node: Node, model: str, body: bytes, needle: str
) -> None:
    code, err = await node.call("POST", f"/v1/models/{model}:predict", data=body)
    assert code == 400 and needle in err["error"], err


V2_REFUSED = [
    ("recip", tensor("x", "FP32", [1e39]), "out of range for FP32"),
    ("recip", tensor("x", "FP32", [True, 1.0]), "numbers"),
    ("recip", tensor("x", "FP32", ["1.5"]), "numbers"),
    ("bytes8", tensor("x", "UINT8", [300]), "out of range for UINT8"),
    ("bytes8", tensor("x", "UINT8", [-1]), "out of range for UINT8"),
    ("gather", tensor("idx", "INT64", [1, True]), "integers"),
    ("gather", tensor("idx", "INT64", [2**63]), "out of range for INT64"),
]


@pytest.mark.parametrize(("model", "spec", "needle"), V2_REFUSED)
async def test_v2_json_refuses_values_that_would_change(
    node: Node, model: str, spec: dict, needle: str
) -> None:
    code, err = await node.call("POST", f"/v2/models/{model}/infer", {"inputs": [spec]})
    assert code == 400 and needle in err["error"], err


async def test_non_finite_outputs_are_null_in_json_and_exact_in_binary(node: Node) -> None:
    """1/0 is infinity: JSON answers (V1 and V2) write null, the binary extension keeps it."""
    code, doc = await node.call("POST", "/v1/models/recip:predict", data=b'{"instances": [0, 2]}')
    assert (code, doc) == (200, {"predictions": [None, 0.5]})
    body = {"inputs": [tensor("x", "FP32", [0.0, 2.0])]}
    code, doc = await node.call("POST", "/v2/models/recip/infer", body)
    assert code == 200 and doc["outputs"][0]["data"] == [None, 0.5]
    body["parameters"] = {"binary_data_output": True}
    async with node.http.post("/v2/models/recip/infer", json=body) as resp:
        raw = await resp.read()
        length = int(resp.headers["Inference-Header-Content-Length"])
    assert np.frombuffer(raw[length:], np.float32).tolist() == [np.inf, 0.5]


# -- 5. output size --------------------------------------------------------------------


async def test_an_answer_over_the_output_limit_is_refused(node: Node) -> None:
    small = {"inputs": [tensor("shape", "INT64", [1000])]}
    assert (await node.call("POST", "/v2/models/fill/infer", small))[0] == 200
    huge = {"inputs": [tensor("shape", "INT64", [OUTPUT_LIMIT])]}  # 4 bytes each
    code, err = await node.call("POST", "/v2/models/fill/infer", huge)
    assert code == 400 and f"over the limit of {OUTPUT_LIMIT}" in err["error"]
    code, details = await node.grpc_error(
        "ModelInfer", grpc_infer("fill", "shape", "INT64", np.array([OUTPUT_LIMIT]))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in details
    # BYTES answers count their real bytes, not their object pointers.
    text = {"inputs": [tensor("x", "BYTES", ["y" * 300_000] * 4)]}
    assert (await node.call("POST", "/v2/models/text/infer", text))[0] == 400


def test_agent_flag_sets_the_output_limit() -> None:
    from nodecache.agent.cli import build_parser

    args = build_parser().parse_args(["agent", "--declarations", "d", "--max-output-bytes", "1Mi"])
    assert args.max_output_bytes == 1 << 20
    default = build_parser().parse_args(["agent", "--declarations", "d"])
    assert default.max_output_bytes == 64 << 20


# -- 6. model versions -----------------------------------------------------------------


async def test_versions_are_checked_against_the_model_everywhere(node: Node) -> None:
    x = {"inputs": [tensor("input", "FP32", [0.0] * 64, [1, 64])]}
    assert (await node.call("POST", "/v2/models/mlp/versions/1/infer", x))[0] == 200
    for path in ("/infer", "", "/ready"):
        method = "POST" if path == "/infer" else "GET"
        body = x if path == "/infer" else None
        code, err = await node.call(method, f"/v2/models/mlp/versions/2{path}", body)
        assert code == 404 and err == {"error": "model 'mlp' version '2' not found"}
        for odd in ("%C3%BC", "a%20b", "x" * 65, "a%0D%0Ab"):
            code, err = await node.call(method, f"/v2/models/mlp/versions/{odd}{path}", body)
            assert code == 400 and "version" in err["error"], (odd, path, err)
    array = np.zeros((1, 64), np.float32)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = (("2", grpc.StatusCode.NOT_FOUND), ("ü", invalid), ("1\r\nGET /x HTTP/1.1", invalid))
    for version, expected in cases:
        request = grpc_infer("mlp", "input", "FP32", array, version)
        assert (await node.grpc_error("ModelInfer", request))[0] == expected, version
        meta = pb.ModelMetadataRequest(name="mlp", version=version)
        assert (await node.grpc_error("ModelMetadata", meta))[0] == expected, version


async def test_a_long_name_is_not_echoed_whole(node: Node) -> None:
    name = "n" * 4000
    code, err = await node.call("POST", f"/v2/models/{name}/infer",
                                {"inputs": [tensor("x", "FP32", [1.0])]})  # fmt: skip
    assert code == 404 and len(err["error"]) < 200
