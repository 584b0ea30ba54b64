"""Triton's own clients against the node: model configuration, statistics and system
shared memory (tritonclient, HTTP and gRPC), in-process and with worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper
from support import Agent, declaration, free_port
from tritonclient.utils import InferenceServerException

from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def fixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX identity over a fixed FP32 [3]: a model without a batch dimension."""
    folder = tmp_path_factory.mktemp("fixed")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return folder


class Node:
    def __init__(self, agent: Agent, http_port: int, grpc_port: int) -> None:
        self.agent, self.http_port, self.grpc_port = agent, http_port, grpc_port
        self.http = triton_http.InferenceServerClient(url=f"127.0.0.1:{http_port}")
        self.grpc = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")


MODELS = ("batched", "plain", "fixed", "counted", "counted-batched", "tv", "types")
KEYS = ("batched", "plain", "fixed", "counted", "counted-batched", "tv-1", "tv-2", "types")


@pytest.fixture(scope="module", params=["in-process", "workers"])
def node(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mlp_dir: Path,
    fixed_dir: Path,
    all_types_dir: Path,
) -> Iterator[Node]:
    agent = Agent(tmp_path_factory.mktemp(request.param) / "agent")
    http_port, grpc_port = free_port(), free_port()
    workers = ["--workers", "2"] if request.param == "workers" else []
    agent.start("--http-port", str(http_port), "--grpc-port", str(grpc_port), *workers)
    batching = {"maxBatchSize": 8, "maxQueueDelay": "20ms"}
    agent.declare("a.yaml", declaration("batched", mlp_dir.as_uri(), batching=batching))
    agent.declare("b.yaml", declaration("plain", mlp_dir.as_uri()))
    agent.declare("c.yaml", declaration("fixed", fixed_dir.as_uri()))
    agent.declare("t.yaml", declaration("types", all_types_dir.as_uri()))
    agent.declare("d.yaml", declaration("counted", mlp_dir.as_uri()))
    agent.declare("e.yaml", declaration("counted-batched", mlp_dir.as_uri(), batching=batching))
    # Two versions of one served name: 1 takes the unpinned requests, 2 only pinned ones.
    for number, traffic in (("1", 100), ("2", 0)):
        serving = {"name": "tv", "version": number, "traffic": traffic}
        agent.declare(f"tv{number}.yaml",
                      declaration(f"tv-{number}", mlp_dir.as_uri(), serving=serving))  # fmt: skip
    for key in KEYS:
        agent.wait_state(key, "Warm")
    yield Node(agent, http_port, grpc_port)
    agent.stop()


def test_server_metadata_lists_the_extensions(node: Node) -> None:
    extensions = set(node.http.get_server_metadata()["extensions"])
    assert {"model_configuration", "statistics", "binary_tensor_data"} <= extensions
    grpc_extensions = set(node.grpc.get_server_metadata(as_json=True)["extensions"])
    assert grpc_extensions == extensions


def test_model_config_of_a_batched_model(node: Node) -> None:
    config = node.http.get_model_config("batched")
    assert config["name"] == "batched"
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64],
                                "format": "FORMAT_NONE", "is_shape_tensor": False,
                                "allow_ragged_batch": False, "optional": False}]  # fmt: skip
    assert config["output"][0]["dims"] == [10]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["version_policy"] == {"specific": {"versions": [1]}}
    assert node.http.get_model_config("batched", "1") == config
    # gRPC says the same, in model_config.proto's own message.
    over_grpc = node.grpc.get_model_config("batched", as_json=True)["config"]
    assert over_grpc["max_batch_size"] == 8
    assert over_grpc["input"][0]["dims"] == ["64"]  # protobuf's JSON writes int64 as text
    assert over_grpc["input"][0]["data_type"] == "TYPE_FP32"
    assert over_grpc["dynamic_batching"]["max_queue_delay_microseconds"] == "20000"


def test_model_config_agrees_with_metadata(node: Node) -> None:
    for name in ("plain", "fixed"):
        meta = node.http.get_model_metadata(name)
        config = node.http.get_model_config(name)
        batch = [-1] if config["max_batch_size"] else []
        for tensor, configured in zip(meta["inputs"], config["input"], strict=True):
            assert tensor["shape"] == batch + configured["dims"]
            assert configured["data_type"] == "TYPE_" + tensor["datatype"]
    assert node.http.get_model_config("fixed")["max_batch_size"] == 0
    assert node.http.get_model_config("fixed")["input"][0]["dims"] == [3]
    assert "dynamic_batching" not in node.http.get_model_config("plain")
    assert node.http.get_model_config("plain")["max_batch_size"] > 8


def test_model_config_of_unknown_models_and_versions(node: Node) -> None:
    with pytest.raises(InferenceServerException, match="not found"):
        node.http.get_model_config("nope")
    with pytest.raises(InferenceServerException, match="not found"):
        node.http.get_model_config("plain", "7")
    with pytest.raises(InferenceServerException) as err:
        node.grpc.get_model_config("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def _infer_http(node: Node, model: str, rows: int) -> None:
    x = np.ones((rows, 64), np.float32)
    inp = triton_http.InferInput("input", [rows, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    node.http.infer(model, [inp])


def _infer_grpc(node: Node, model: str, rows: int) -> None:
    inp = triton_grpc.InferInput("input", [rows, 64], "FP32")
    inp.set_data_from_numpy(np.ones((rows, 64), np.float32))
    node.grpc.infer(model, [inp])


def _stats(node: Node, model: str) -> dict:
    (entry,) = node.http.get_inference_statistics(model)["model_stats"]
    return entry


def test_statistics_count_every_request(node: Node) -> None:
    for _ in range(3):
        _infer_http(node, "counted", 2)
    for _ in range(2):
        _infer_grpc(node, "counted", 1)
    bad = triton_http.InferInput("input", [1, 3], "FP32")
    bad.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException):
        node.http.infer("counted", [bad])
    stats = _stats(node, "counted")
    assert (stats["name"], stats["version"]) == ("counted", "1")
    assert stats["inference_count"] == 3 * 2 + 2
    assert stats["execution_count"] == 5
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 5 and inference["fail"]["count"] == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[phase]["count"] == 5
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"] > 0
    assert stats["last_inference"] > 0
    assert node.http.get_inference_statistics("counted", "1")["model_stats"] == [stats]
    # gRPC reads the same counters.
    over_grpc = node.grpc.get_inference_statistics("counted", as_json=True)["model_stats"][0]
    assert int(over_grpc["inference_count"]) == 8
    assert int(over_grpc["inference_stats"]["fail"]["count"]) == 1


def test_statistics_of_a_batched_model(node: Node) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _infer_grpc(node, "counted-batched", 2), range(4)))
    stats = _stats(node, "counted-batched")
    assert stats["inference_count"] == 8
    assert stats["inference_stats"]["success"]["count"] == 4
    # Batches ran as fewer (or as many) runtime calls, each of its own size.
    assert 1 <= stats["execution_count"] <= 4
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert sum(size * count for size, count in sizes.items()) == 8


def test_statistics_of_every_model(node: Node) -> None:
    everything = node.http.get_inference_statistics()["model_stats"]
    assert sorted((s["name"], s["version"]) for s in everything) == sorted(
        [(m, "1") for m in MODELS] + [("tv", "2")]
    )
    over_grpc = node.grpc.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in over_grpc} == set(MODELS)
    with pytest.raises(InferenceServerException, match="not found"):
        node.http.get_inference_statistics("nope")


def test_what_the_node_does_not_serve_is_unimplemented(node: Node) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}"))
    for call, request in (
        (stub.CudaSharedMemoryStatus, pb.CudaSharedMemoryStatusRequest()),
        (stub.TraceSetting, pb.TraceSettingRequest()),
        (stub.LogSettings, pb.LogSettingsRequest()),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(InferenceServerException):
        node.http.get_cuda_shared_memory_status()


# -- system shared memory ------------------------------------------------------------------

ROWS = 4
IN_BYTES, OUT_BYTES = ROWS * 64 * 4, ROWS * 10 * 4


@pytest.fixture
def regions(request: pytest.FixtureRequest) -> Iterator[tuple[object, object, str]]:
    """An input region holding a [4, 64] FP32 tensor and an output region, under names
    of this test's own."""
    tag = request.node.name.translate(str.maketrans("[]-", "___"))[-40:]
    inp = shm.create_shared_memory_region(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES)
    out = shm.create_shared_memory_region(f"out_{tag}", f"/nc_out_{tag}", OUT_BYTES)
    shm.set_shared_memory_region(inp, [X])
    yield inp, out, tag
    shm.destroy_shared_memory_region(inp)
    shm.destroy_shared_memory_region(out)


X = np.random.default_rng(7).standard_normal((ROWS, 64)).astype(np.float32)


def _ordinary(node: Node) -> np.ndarray:
    inp = triton_http.InferInput("input", [ROWS, 64], "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    return node.http.infer("plain", [inp]).as_numpy("output")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shared_memory_register_infer_status_unregister(
    node: Node, regions: tuple, protocol: str
) -> None:
    _, out_handle, tag = regions
    module = triton_http if protocol == "http" else triton_grpc
    client = node.http if protocol == "http" else node.grpc
    client.register_system_shared_memory(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES)
    client.register_system_shared_memory(f"out_{tag}", f"/nc_out_{tag}", OUT_BYTES)
    status = client.get_system_shared_memory_status()
    if protocol == "grpc":
        status = [
            {**r, "offset": int(r.get("offset", 0)), "byte_size": int(r["byte_size"])}
            for r in client.get_system_shared_memory_status(as_json=True)["regions"].values()
        ]
    assert {(r["name"], r["key"], r["byte_size"]) for r in status} == {
        (f"in_{tag}", f"/nc_in_{tag}", IN_BYTES), (f"out_{tag}", f"/nc_out_{tag}", OUT_BYTES)
    }  # fmt: skip

    inp = module.InferInput("input", [ROWS, 64], "FP32")
    inp.set_shared_memory(f"in_{tag}", IN_BYTES)
    out = module.InferRequestedOutput("output")
    out.set_shared_memory(f"out_{tag}", OUT_BYTES)
    result = client.infer("plain", [inp], outputs=[out])
    described = result.get_output("output")
    if protocol == "grpc":
        described = {"datatype": described.datatype, "shape": list(described.shape)}
    assert described["datatype"] == "FP32" and described["shape"] == [ROWS, 10]
    got = shm.get_contents_as_numpy(out_handle, np.float32, [ROWS, 10])
    np.testing.assert_array_equal(got, _ordinary(node))

    client.unregister_system_shared_memory(f"in_{tag}")
    assert [r["name"] for r in _status(client, protocol)] == [f"out_{tag}"]
    client.unregister_system_shared_memory()
    assert _status(client, protocol) == []
    with pytest.raises(InferenceServerException, match="no shared memory region"):
        client.infer("plain", [inp], outputs=[out])


def _status(client, protocol: str) -> list[dict]:  # type: ignore[no-untyped-def]
    if protocol == "http":
        return client.get_system_shared_memory_status()
    return list(client.get_system_shared_memory_status(as_json=True).get("regions", {}).values())


def test_shared_memory_out_of_bounds_is_refused(node: Node, regions: tuple) -> None:
    _, _, tag = regions
    client = node.http
    with pytest.raises(InferenceServerException, match="past the end"):
        client.register_system_shared_memory(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES, offset=8)
    client.register_system_shared_memory(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES)
    client.register_system_shared_memory(f"out_{tag}", f"/nc_out_{tag}", OUT_BYTES)
    try:
        # An input reaching past its region, and an output region too small for the answer.
        inp = triton_http.InferInput("input", [ROWS, 64], "FP32")
        inp.set_shared_memory(f"in_{tag}", IN_BYTES, offset=4)
        with pytest.raises(InferenceServerException, match="do not fit"):
            client.infer("plain", [inp])
        inp = triton_http.InferInput("input", [ROWS, 64], "FP32")
        inp.set_shared_memory(f"in_{tag}", IN_BYTES)
        small = triton_http.InferRequestedOutput("output")
        small.set_shared_memory(f"out_{tag}", OUT_BYTES - 4)
        with pytest.raises(InferenceServerException, match="more than the"):
            client.infer("plain", [inp], outputs=[small])
        beyond = triton_grpc.InferRequestedOutput("output")
        beyond.set_shared_memory(f"out_{tag}", OUT_BYTES, offset=OUT_BYTES)
        grpc_inp = triton_grpc.InferInput("input", [ROWS, 64], "FP32")
        grpc_inp.set_shared_memory(f"in_{tag}", IN_BYTES)
        # The same process over gRPC: the same caller, the same regions.
        with pytest.raises(InferenceServerException, match="do not fit"):
            node.grpc.infer("plain", [grpc_inp], outputs=[beyond])
    finally:
        client.unregister_system_shared_memory()


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "/a/b", "..", "", "/dev/shm/x", "x" * 300, "nc_missing"]
)
def test_shared_memory_keys_name_one_file_of_dev_shm(node: Node, key: str) -> None:
    with pytest.raises(InferenceServerException) as err:
        node.http.register_system_shared_memory("bad", key, 4)
    assert "shared memory key" in str(err.value)
    assert node.http.get_system_shared_memory_status() == []


_OTHER_USER = """
import os, sys, numpy as np, tritonclient.http as http
http.InferenceServerClient(url=sys.argv[1]).is_server_live()  # every import done as root
os.setgid(65534)
os.setuid(65534)  # from here on, another user's process
client = http.InferenceServerClient(url=sys.argv[1])
inp = http.InferInput("input", [4, 64], "FP32")
inp.set_shared_memory(sys.argv[2], 4 * 64 * 4)
try:
    client.infer("plain", [inp])
except Exception as exc:
    print(exc)
print(client.get_system_shared_memory_status())
"""


def test_shared_memory_regions_are_the_callers_own(node: Node, regions: tuple) -> None:
    """Another user's process neither sees nor uses a region by its name."""
    _, _, tag = regions
    node.http.register_system_shared_memory(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES)
    try:
        other = subprocess.run(
            [sys.executable, "-c", _OTHER_USER, f"127.0.0.1:{node.http_port}", f"in_{tag}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert f"no shared memory region 'in_{tag}'" in other.stdout
        assert other.stdout.strip().endswith("[]")
    finally:
        node.http.unregister_system_shared_memory()


_REGISTER_AND_EXIT = """
import sys, tritonclient.http as http
client = http.InferenceServerClient(url=sys.argv[1])
client.register_system_shared_memory(sys.argv[2], sys.argv[3], 16)
"""


def test_a_region_goes_with_its_caller(node: Node, regions: tuple) -> None:
    _, _, tag = regions
    name, key = f"gone_{tag}", f"/nc_in_{tag}"
    node.http.register_system_shared_memory(name, key, 16)
    with pytest.raises(InferenceServerException, match="already registered"):
        node.http.register_system_shared_memory(name, key, 16)
    node.http.unregister_system_shared_memory(name)
    done = subprocess.run(
        [sys.executable, "-c", _REGISTER_AND_EXIT, f"127.0.0.1:{node.http_port}", name, key],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Same user, so same scope: the name is free again once its process has gone.
    node.http.register_system_shared_memory(name, key, 16)
    node.http.unregister_system_shared_memory(name)


def test_shared_memory_over_the_node_socket(node: Node, regions: tuple) -> None:
    """Callers on the socket are known by their peer credentials, as pods are."""
    _, out_handle, tag = regions
    agent = node.agent
    register = {"key": f"/nc_in_{tag}", "offset": 0, "byte_size": IN_BYTES}
    assert agent.request("POST", f"/v2/systemsharedmemory/region/in_{tag}/register",
                         register)[0] == 200  # fmt: skip
    register = {"key": f"/nc_out_{tag}", "offset": 0, "byte_size": OUT_BYTES}
    assert agent.request("POST", f"/v2/systemsharedmemory/region/out_{tag}/register",
                         register)[0] == 200  # fmt: skip
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [ROWS, 64], "parameters": {
            "shared_memory_region": f"in_{tag}", "shared_memory_byte_size": IN_BYTES}}],
        "outputs": [{"name": "output", "parameters": {
            "shared_memory_region": f"out_{tag}", "shared_memory_byte_size": OUT_BYTES}}],
    }  # fmt: skip
    code, answer = agent.request("POST", "/v2/models/plain/infer", body)
    assert code == 200, answer
    assert answer["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [ROWS, 10]}]
    got = shm.get_contents_as_numpy(out_handle, np.float32, [ROWS, 10])
    np.testing.assert_array_equal(got, _ordinary(node))
    code, listed = agent.request("GET", "/v2/systemsharedmemory/status")
    assert code == 200 and len(listed) == 2
    assert agent.request("POST", "/v2/systemsharedmemory/unregister")[0] == 200
    assert agent.request("GET", "/v2/systemsharedmemory/status") == (200, [])


def test_a_region_shrunk_under_the_node_is_refused_not_a_crash(node: Node, regions: tuple) -> None:
    _, _, tag = regions
    node.http.register_system_shared_memory(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES)
    try:
        os.truncate(f"/dev/shm/nc_in_{tag}", 16)  # the caller's own file, after registering
        inp = triton_http.InferInput("input", [ROWS, 64], "FP32")
        inp.set_shared_memory(f"in_{tag}", IN_BYTES)
        with pytest.raises(InferenceServerException, match="shrank"):
            node.http.infer("plain", [inp])
        assert node.http.is_server_live() and _ordinary(node).shape == (ROWS, 10)
    finally:
        node.http.unregister_system_shared_memory()


def test_repository_calls_from_triton_and_kserve_protos(node: Node) -> None:
    """Triton's clients name the model in field 2; KServe's proto puts it in field 1."""
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{node.grpc_port}"))
    node.grpc.load_model("fixed")  # tritonclient: model_name
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(repository_name="fixed"))  # KServe
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(repository_name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_hostile_shared_memory_requests_get_400(node: Node) -> None:
    agent = node.agent
    bad_bodies = [
        {"inputs": 3, "note": "shared_memory_region"},
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "parameters": {
            "shared_memory_region": "r", "shared_memory_byte_size": -1}}]},
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "parameters": {
            "shared_memory_region": 5, "shared_memory_byte_size": 256}}]},
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": "x", "parameters": {
            "shared_memory_region": "never", "shared_memory_byte_size": 256}}]},
    ]  # fmt: skip
    for body in bad_bodies:
        code, answer = agent.request("POST", "/v2/models/plain/infer", body)
        assert code == 400, (body, answer)
    for path, body in (
        ("/v2/systemsharedmemory/region/r/register", {"key": "k", "byte_size": "1"}),
        ("/v2/systemsharedmemory/region/r/register", {"key": "k", "offset": -1, "byte_size": 1}),
        ("/v2/systemsharedmemory/region/r/register", [1, 2]),
        ("/v2/systemsharedmemory/region/r/status", None),
    ):
        method = "GET" if path.endswith("status") else "POST"
        assert agent.request(method, path, body)[0] == 400, path
    # Tensor bytes that happen to spell the parameter are only bytes.
    x = np.frombuffer(b"shared_memory_region".ljust(256, b"\0"), np.float32).reshape(1, 64)
    inp = triton_http.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    assert node.http.infer("plain", [inp]).as_numpy("output").shape == (1, 10)


def test_configuration_and_statistics_follow_the_versions(node: Node) -> None:
    """A served name with two versions: its configuration lists both; its statistics count
    each version's requests apart, whichever protocol pinned them."""
    config = node.http.get_model_config("tv")
    assert config["name"] == "tv" and config["version_policy"] == {"specific": {"versions": [1, 2]}}
    assert node.http.get_model_config("tv", "2")["name"] == "tv"
    for _ in range(3):
        _infer_http(node, "tv", 1)  # unpinned: version 1 (version 2 has no traffic)
    for rows in (1, 2):
        inp = triton_grpc.InferInput("input", [rows, 64], "FP32")
        inp.set_data_from_numpy(np.ones((rows, 64), np.float32))
        node.grpc.infer("tv", [inp], model_version="2")
    stats = node.http.get_inference_statistics("tv")["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in stats] == [
        ("tv", "1", 3), ("tv", "2", 3)
    ]  # fmt: skip
    (two,) = node.http.get_inference_statistics("tv", "2")["model_stats"]
    assert two["inference_stats"]["success"]["count"] == 2
    with pytest.raises(InferenceServerException, match="not found"):
        node.http.get_inference_statistics("tv", "3")


DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES")  # fmt: skip


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inputs_in_shared_memory_beside_inputs_in_the_request(
    node: Node, regions: tuple, protocol: str
) -> None:
    """One input in shared memory, the others sent as usual (gRPC: raw contents for those
    only, as Triton's clients send them)."""
    inp_handle, _, tag = regions
    module = triton_http if protocol == "http" else triton_grpc
    client = node.http if protocol == "http" else node.grpc
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    shm.set_shared_memory_region(inp_handle, [x])
    client.register_system_shared_memory(f"in_{tag}", f"/nc_in_{tag}", IN_BYTES)
    try:
        inputs = []
        for datatype in DATATYPES:
            if datatype == "FP32":
                inp = module.InferInput("in_FP32", [2, 2], "FP32")
                inp.set_shared_memory(f"in_{tag}", x.nbytes)
            else:
                inp = module.InferInput(f"in_{datatype}", [0, 2], datatype)
                dtype = (
                    np.object_ if datatype == "BYTES" else triton_http.triton_to_np_dtype(datatype)
                )
                inp.set_data_from_numpy(np.zeros((0, 2), dtype=dtype))
            inputs.append(inp)
        outputs = [module.InferRequestedOutput("out_FP32")]
        result = client.infer("types", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("out_FP32"), x)
    finally:
        client.unregister_system_shared_memory()
