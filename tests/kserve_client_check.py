"""Run in its own process by test_clients.py: KServe's clients against a running agent.

KServe's and Triton's generated gRPC modules both claim the "inference" protobuf names
in the default descriptor pool, so they cannot share a process.
"""

from __future__ import annotations

import asyncio
import sys

import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(http_port: int, grpc_port: int, socket: str, model: str = "mlp") -> None:
    """``socket`` "-": no node socket to try (a TCP-only endpoint, such as the proxy);
    ``model``: the name the endpoint serves the MLP under."""
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    request_inputs = [InferInput("input", [2, 64], "FP32")]
    request_inputs[0].set_data_from_numpy(x, binary_data=False)
    request = InferRequest(model_name=model, infer_inputs=request_inputs, request_id="k1")
    answers = []

    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    assert await rest.is_server_ready(f"http://127.0.0.1:{http_port}")
    assert await rest.is_model_ready(f"http://127.0.0.1:{http_port}", model)
    response = await rest.infer(f"http://127.0.0.1:{http_port}", request, model_name=model)
    assert response.model_name == model
    answers.append(response.outputs[0].as_numpy())
    await rest.close()

    # KServe V1: {"instances": [...]} in, {"predictions": [...]} out.
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    assert await v1.is_model_ready(f"http://127.0.0.1:{http_port}", model)
    doc = {"instances": x.tolist()}
    predicted = await v1.infer(f"http://127.0.0.1:{http_port}", doc, model_name=model)
    answers.append(np.array(predicted["predictions"], dtype=np.float32))
    await v1.close()

    if socket != "-":  # the node socket, through httpx's Unix-socket transport
        uds = InferenceRESTClient(
            RESTConfig(protocol="v2", transport=httpx.AsyncHTTPTransport(uds=socket))
        )
        response = await uds.infer("http://localhost", request, model_name=model)
        answers.append(response.outputs[0].as_numpy())
        await uds.close()

    grpc_client = InferenceGRPCClient(f"127.0.0.1:{grpc_port}")
    request_inputs[0].set_data_from_numpy(x, binary_data=True)
    assert await grpc_client.is_model_ready(model)
    response = await grpc_client.infer(InferRequest(model, request_inputs, request_id="k2"))
    assert response.model_name == model
    answers.append(response.outputs[0].as_numpy())
    await grpc_client.close()

    for answer in answers:
        np.testing.assert_allclose(answer.reshape(2, 10), answers[0].reshape(2, 10), rtol=1e-6)
    np.save(sys.stdout.buffer, answers[0].reshape(2, 10))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:]))
