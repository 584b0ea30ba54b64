"""A standing defence: generated hostile requests and declarations against real agents.

Two agents run for the whole module, one serving in-process and one routing to a worker
process (``--workers 1``). Hypothesis throws OIP requests at them — JSON, the binary tensor
extension, KServe V1, gRPC — with odd targets and headers, and declaration files at the
folder they watch. Every answer must be 2xx or 4xx with an OIP error body, nothing may
hang, memory stays bounded, and after each one a well-formed request from another client
gets its own right answer.

The examples are derandomized so CI is repeatable; ``NODECACHE_FUZZ_EXAMPLES=2000`` runs
more of them, and ``NODECACHE_FUZZ_RANDOM=1`` draws new ones.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Agent, declaration, wait_for

from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("NODECACHE_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("NODECACHE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIMEOUT = 20.0
"""No answer may take longer: past this the request counts as a hang."""
RSS_LIMIT = 2 << 30
"""Resident memory any agent or worker process may reach during the module."""
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES"]  # fmt: skip


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(self._path)


@pytest.fixture(scope="module", params=["in-process", "routed"])
def target(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mlp_dir: Path,
    all_types_dir: Path,
) -> Iterator[Agent]:
    agent = Agent(tmp_path_factory.mktemp(f"fuzz-{request.param}") / "agent")
    extra = ["--workers", "1", "--spread-at", "0"] if request.param == "routed" else []
    agent.start("--grpc-port", "0", *extra)
    agent.declare("mlp.yaml", declaration("mlp", mlp_dir.as_uri()))
    agent.declare("types.yaml", declaration("types", all_types_dir.as_uri()))
    agent.wait_state("mlp", "Warm")
    agent.wait_state("types", "Warm")
    yield agent
    assert_memory_bounded(agent)
    agent.stop()


@pytest.fixture(scope="module")
def reference(mlp_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(mlp_dir / "model.onnx"))


def send(
    agent: Agent, method: str, target: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes, http.client.HTTPMessage]:
    connection = UnixHTTPConnection(agent.socket)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "localhost")
        for name, value in headers.items():
            connection.putheader(name, value.encode("latin-1"))
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read(), response.headers
    finally:
        connection.close()


def check_answer(answer: tuple[int, bytes, http.client.HTTPMessage], context: object) -> None:
    """2xx, or a 4xx with an OIP error body; 503 (overload, with Retry-After) is allowed."""
    status, payload, headers = answer
    assert status < 500 or (status == 503 and headers["Retry-After"]), (
        status, payload[:300], context
    )  # fmt: skip
    if status >= 400:
        doc = json.loads(payload)
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str), (payload[:300],)
        assert "Traceback" not in doc["error"] and "/onnxruntime_src/" not in doc["error"]


def check_still_right(agent: Agent, session: ort.InferenceSession, seed: int) -> None:
    """Another client's well-formed request gets its own right answer."""
    x = np.random.default_rng(seed).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    status, payload, _ = send(
        agent, "POST", "/v2/models/mlp/infer", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200, payload[:300]
    output = json.loads(payload)["outputs"][0]
    got = np.array(output["data"], np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5)


def assert_memory_bounded(agent: Agent) -> None:
    assert agent.proc is not None
    pids = [agent.proc.pid] + [d["pid"] for d in agent.status()["devices"] if d.get("pid")]
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        assert rss * 1024 < RSS_LIMIT, (pid, rss)


# -- strategies --------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=40)
shapes = st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4) | st.just([2, 64])
names = st.sampled_from(["input", "in_FP32", "in_BYTES", "in_INT64", "in_BOOL"]) | st.text(
    max_size=12
)
tensor = st.fixed_dictionaries(
    {"name": names, "datatype": st.sampled_from(DATATYPES) | st.text(max_size=6),
     "shape": shapes, "data": nested},
    optional={"parameters": st.dictionaries(st.text(max_size=8), scalars, max_size=3)},
)  # fmt: skip
json_requests = st.one_of(
    st.fixed_dictionaries(
        {"inputs": st.lists(tensor, max_size=3)},
        optional={
            "id": st.text(max_size=10) | st.integers(),
            "outputs": st.lists(st.fixed_dictionaries({"name": names}), max_size=2),
            "parameters": st.dictionaries(st.text(max_size=8), scalars, max_size=3),
        },
    ),
    nested,
    st.dictionaries(st.text(max_size=8), nested, max_size=4),
)
models = st.sampled_from(["mlp", "types"])
# What follows /v2/models/: real names, versions that cannot be, encodings of CR/LF/..
tails = st.one_of(
    st.sampled_from(["", "/versions/1", "/versions/2", "/versions/%0D%0AX:y",
                     "/versions/1%20HTTP%2F1.1", "/../../nodecache/v1/worker/status",
                     "/versions/%C3%A9", "%0D%0A"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                   exclude_characters="?#"), max_size=12).map(lambda t: "/" + t),
)  # fmt: skip
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
)
headers = st.dictionaries(
    st.sampled_from(["Content-Type", "Accept", "Expect", "X-Nodecache-Protocol", "Connection",
                     "Transfer-Encoding-Not", "Inference-Header-Content-Length", "X-Other",
                     "Traceparent", "Upgrade"]),
    header_values,
    max_size=4,
)  # fmt: skip


# -- the tests ---------------------------------------------------------------------------


@FUZZ
@given(model=models, tail=tails, doc=json_requests, extra=headers, seed=st.integers(0, 9))
def test_json_requests(
    target: Agent, reference: ort.InferenceSession,
    model: str, tail: str, doc: Any, extra: dict[str, str], seed: int,
) -> None:  # fmt: skip
    extra.pop("Expect", None)  # http.client cannot answer a 100 Continue; tested elsewhere
    extra.pop("Connection", None)
    body = json.dumps(doc).encode()
    path = f"/v2/models/{model}{tail}/infer"
    check_answer(send(target, "POST", path, body, extra), (path, body[:200], extra))
    check_still_right(target, reference, seed)


@FUZZ
@given(
    doc=json_requests,
    header_length=st.integers(min_value=-5, max_value=1 << 40) | st.none(),
    binary=st.binary(max_size=4096),
    seed=st.integers(0, 9),
)
def test_binary_extension_requests(
    target: Agent, reference: ort.InferenceSession,
    doc: Any, header_length: int | None, binary: bytes, seed: int,
) -> None:  # fmt: skip
    head = json.dumps(doc).encode()
    length = len(head) if header_length is None else header_length
    for model in ("mlp", "types"):
        answer = send(
            target, "POST", f"/v2/models/{model}/infer", head + binary,
            {"Inference-Header-Content-Length": str(length),
             "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        check_answer(answer, (model, head[:200], length))
    check_still_right(target, reference, seed)


@FUZZ
@given(instances=nested, wrap=st.booleans(), seed=st.integers(0, 9))
def test_v1_requests(
    target: Agent, reference: ort.InferenceSession, instances: Any, wrap: bool, seed: int
) -> None:
    doc = {"instances": instances} if wrap else instances
    for model in ("mlp", "types"):
        answer = send(target, "POST", f"/v1/models/{model}:predict", json.dumps(doc).encode(), {})
        check_answer(answer, (model, doc))
    check_still_right(target, reference, seed)


@FUZZ
@given(
    model=models | st.text(max_size=12),
    version=st.text(max_size=20),
    inputs=st.lists(
        st.tuples(names, st.sampled_from(DATATYPES) | st.text(max_size=5),
                  st.lists(st.integers(min_value=-2, max_value=2**33), max_size=3),
                  st.binary(max_size=600)),
        max_size=3,
    ),
    seed=st.integers(0, 9),
)  # fmt: skip
def test_grpc_requests(
    target: Agent, reference: ort.InferenceSession,
    model: str, version: str, inputs: list[tuple[str, str, list[int], bytes]], seed: int,
) -> None:  # fmt: skip
    channel = grpc.insecure_channel(f"unix:{target.socket_dir / 'nodecache-grpc.sock'}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=s)
                for n, d, s, _ in inputs],
        raw_input_contents=[raw for *_, raw in inputs],
    )  # fmt: skip
    calls = [
        lambda: stub.ModelInfer(request, timeout=TIMEOUT),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version),
                                   timeout=TIMEOUT),
        lambda: stub.ModelReady(pb.ModelReadyRequest(name=model, version=version),
                                timeout=TIMEOUT),
    ]  # fmt: skip
    try:
        for call in calls:
            try:
                call()
            except grpc.RpcError as exc:
                assert exc.code() in {
                    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.PERMISSION_DENIED,
                }, (exc.code(), exc.details(), model, version)  # fmt: skip
    finally:
        channel.close()
    check_still_right(target, reference, seed)


yaml_scalars = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=30),
    st.sampled_from(["10Mi", "-1", "1e400", "NaN", ".inf", "s3://", "file:///nonexistent",
                     "http://[::1", "hf://x", "../../etc"]),
)  # fmt: skip
yaml_docs = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)  # fmt: skip
specs = st.fixed_dictionaries(
    {},
    optional={
        "sourceModelUri": yaml_scalars, "modelSize": yaml_scalars, "nodeGroups": yaml_docs,
        "format": yaml_scalars, "runtime": yaml_scalars, "warm": yaml_docs,
        "storage": yaml_docs,
    },
)  # fmt: skip


@FUZZ
@given(
    spec=specs,
    name=st.text(max_size=20).filter(lambda n: n not in ("mlp", "types")),
    raw=st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=300)),
    seed=st.integers(0, 9),
)
def test_declarations(
    target: Agent, reference: ort.InferenceSession,
    spec: dict[str, Any], name: str, raw: bytes | str | None, seed: int,
) -> None:  # fmt: skip
    """A broken declaration never stops the agent or the models it already serves."""
    path = target.declarations / "fuzz.yaml"
    if raw is None:
        doc = {"apiVersion": "nodecache.io/v1alpha1", "kind": "LocalModelCache",
               "metadata": {"name": name}, "spec": spec}  # fmt: skip
        path.write_text(json.dumps(doc))
    elif isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw)
    try:
        wait_for(lambda: target.request("GET", "/v2/health/ready")[0] == 200, TIMEOUT,
                 "the agent to stay ready")  # fmt: skip
        status = target.status()
        assert len(json.dumps(status)) < 1 << 20  # no expansion into the status answer
        check_still_right(target, reference, seed)
    finally:
        path.unlink()
