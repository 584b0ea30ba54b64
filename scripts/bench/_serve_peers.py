"""The servers ours is measured against, each started by scripts/bench/serve.py.

    python _serve_peers.py bare   MODEL PORT SOCKET   (project venv: aiohttp + onnxruntime)
    python _serve_peers.py kserve MODEL PORT          (.bench/venv-kserve)
    mlserver start DIR                                (.bench/venv-mlserver; DIR from
                                                       write_mlserver_repo, runtime below)

Every peer runs the same ONNX file with the same session options as ours
(one intra-op and one inter-op thread), so the server around it is what differs.
Only the standard library is imported at the top: each peer runs in its own venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODEL_NAME = "mlp"
HEADER_LENGTH = "Inference-Header-Content-Length"


def session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


# -- the ceiling: a bare aiohttp handler calling onnxruntime on the event loop ------------


def run_bare(model: str, port: int, socket_path: str) -> None:
    import numpy as np
    from aiohttp import web

    sess = session(model)

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        length = request.headers.get(HEADER_LENGTH)
        if length is None:
            doc = json.loads(body)
            spec = doc["inputs"][0]
            x = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
        else:
            doc = json.loads(body[: int(length)])
            spec = doc["inputs"][0]
            x = np.frombuffer(body, dtype=np.float32, offset=int(length)).reshape(spec["shape"])
        y = sess.run(None, {spec["name"]: x})[0]
        out: dict[str, Any] = {"name": "output", "datatype": "FP32", "shape": list(y.shape)}
        if doc.get("parameters", {}).get("binary_data_output"):
            raw = y.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            header = json.dumps({"model_name": MODEL_NAME, "outputs": [out]}).encode()
            return web.Response(
                body=header + raw,
                content_type="application/octet-stream",
                headers={HEADER_LENGTH: str(len(header))},
            )
        out["data"] = y.ravel().tolist()
        return web.json_response({"model_name": MODEL_NAME, "outputs": [out]})

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def start() -> None:
        import asyncio

        app = web.Application()
        app.router.add_post(f"/v2/models/{MODEL_NAME}/infer", infer)
        app.router.add_get("/v2/health/live", live)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await web.UnixSite(runner, socket_path).start()
        await asyncio.Event().wait()

    import asyncio

    asyncio.run(start())


# -- KServe: a kserve.Model calling onnxruntime, request and latency logging off ----------


def run_kserve(model: str, port: int) -> None:
    import kserve
    import uvicorn
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest import server as rest_server

    # KServe binds 0.0.0.0 unconditionally; keep the benchmark on loopback.
    config = uvicorn.Config

    def loopback_config(*args: Any, **kwargs: Any) -> Any:
        kwargs["host"] = "127.0.0.1"
        return config(*args, **kwargs)

    rest_server.uvicorn.Config = loopback_config  # type: ignore[attr-defined]

    class OnnxMLP(kserve.Model):  # type: ignore[misc]
        def load(self) -> bool:
            self.session = session(model)
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> Any:
            x = payload.inputs[0].as_numpy()
            y = self.session.run(None, {payload.inputs[0].name: x})[0]
            binary = bool((payload.parameters or {}).get("binary_data_output"))
            out = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
            out.set_data_from_numpy(y, binary_data=binary)
            return InferResponse(
                response_id=payload.id or "",
                model_name=self.name,
                infer_outputs=[out],
                use_binary_outputs=binary,
            )

    served = OnnxMLP(MODEL_NAME)
    served.load()
    kserve.ModelServer(
        http_port=port,
        enable_grpc=False,
        enable_latency_logging=False,
        access_log_format=None,
        workers=1,
    ).start([served])


# -- MLServer: a custom runtime calling onnxruntime, parallel_workers 0 -------------------

MLSERVER_RUNTIME = """\
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxMLP(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request = payload.inputs[0]
        x = NumpyCodec.decode_input(request)
        y = self._session.run(None, {request.name: x})[0]
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("output", y)]
        )
"""


def write_mlserver_repo(folder: Path, model: Path, ports: dict[str, int]) -> Path:
    """A folder ``mlserver start`` serves: settings, the model's settings, the runtime."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runtime.py").write_text(MLSERVER_RUNTIME)
    settings = {
        "parallel_workers": 0,
        "debug": False,  # no access log: request logging off for every server alike
        "host": "127.0.0.1",
        "http_port": ports["http"],
        "grpc_port": ports["grpc"],
        "metrics_port": ports["metrics"],
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "runtime.OnnxMLP",
        "parameters": {"uri": str(model)},
    }
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    return folder


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "bare":
        run_bare(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif kind == "kserve":
        run_kserve(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown peer {kind}")
