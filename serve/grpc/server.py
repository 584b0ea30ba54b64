"""``inference.GRPCInferenceService`` over the same dataplane as REST.

Tensors arrive typed (``contents``) or raw (``raw_input_contents``); answers are
always raw (``raw_output_contents``), as Triton does and every OIP client reads.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.errors import InvalidInput, ServeError, excerpt
from nodecache.serve.grpc import oip_pb2 as pb
from nodecache.serve.grpc import oip_pb2_grpc as pb_grpc
from nodecache.serve.protocol import (
    DEFAULT_MAX_ELEMENTS,
    InferRequest,
    InferResponse,
    RequestedOutput,
    sized_work,
    tensor_bytes,
)
from nodecache.serve.tensors import decode_tensor, encode_tensor

__all__ = ["GrpcServer", "OipServicer"]

log = logging.getLogger(__name__)

# Typed contents field for each datatype (FP16 has none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameters(params: Any) -> dict[str, Any]:
    found = {key: value.WhichOneof("parameter_choice") for key, value in params.items()}
    return {key: getattr(params[key], kind) for key, kind in found.items() if kind}


def decode_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if raw:
            name, array = decode_tensor(spec, raw[i], max_elements=DEFAULT_MAX_ELEMENTS)
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise InvalidInput(
                    f"input {excerpt(tensor.name)}: {excerpt(tensor.datatype)} must be sent raw"
                )
            spec["data"] = list(getattr(tensor.contents, field))
            name, array = decode_tensor(spec, max_elements=DEFAULT_MAX_ELEMENTS)
        if name in inputs:
            raise InvalidInput(f"input {excerpt(name)} is given twice")
        inputs[name] = array
    outputs = [RequestedOutput(o.name, True) for o in request.outputs] or None
    return InferRequest(
        inputs=inputs,
        id=request.id or None,
        parameters=_parameters(request.parameters),
        outputs=outputs,
        binary_outputs=True,
    )


def encode_infer_response(result: InferResponse) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=result.model_name,
        model_version=result.model_version or "",
        id=result.id or "",
    )
    for name, array in result.outputs.items():
        spec, raw = encode_tensor(name, array, binary=True)
        response.outputs.add(name=name, datatype=spec["datatype"], shape=spec["shape"])
        response.raw_output_contents.append(raw or b"")
    return response


Gate = Callable[[str], "str | None"]
Call = TypeVar("Call", bound=Callable[..., Awaitable[Any]])


def _answers(handler: Call) -> Call:
    """Every call ends in an answer or a status the client can act on: a ServeError in its
    own code (the table beside each error's HTTP status), anything else INTERNAL with a
    generic message, its details logged. Never UNKNOWN, never a path or traceback."""

    @functools.wraps(handler)
    async def run(self: OipServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except ServeError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error", extra={"rpc": handler.__name__})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return run  # type: ignore[return-value]


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, gate: Gate | None = None) -> None:
        self.dataplane = dataplane
        self._gate = gate

    async def _admit(self, context: grpc.aio.ServicerContext, model: str) -> None:
        refusal = self._gate(model) if self._gate is not None else None
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

    async def ServerLive(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # type: ignore[no-untyped-def]
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # type: ignore[no-untyped-def]
        meta = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    @_answers
    async def ModelReady(self, request, context):  # type: ignore[no-untyped-def]
        await self._admit(context, request.name)
        ready = self.dataplane.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @_answers
    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
        await self._admit(context, request.name)
        meta = await self.dataplane.model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    @_answers
    async def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]
        await self._admit(context, request.model_name)
        infer_request = await sized_work(request.ByteSize(), decode_infer_request, request)
        result = await self.dataplane.infer(
            request.model_name, infer_request, request.model_version or None, protocol="grpc"
        )
        return await sized_work(tensor_bytes(result.outputs), encode_infer_response, result)

    @_answers
    async def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        await self._admit(context, request.model_name)
        await self.dataplane.load(request.model_name)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    @_answers
    async def RepositoryModelUnload(self, request, context):  # type: ignore[no-untyped-def]
        await self._admit(context, request.model_name)
        await self.dataplane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)


class GrpcServer:
    """gRPC on a Unix socket (mode 0660) and, if asked, on a TCP port."""

    def __init__(
        self,
        dataplane: DataPlane,
        socket_path: Path,
        *,
        tcp_host: str = "127.0.0.1",
        tcp_port: int | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        socket_group: int | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._group = socket_group
        self._tcp = (tcp_host, tcp_port)
        self.tcp_port: int | None = None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._server = grpc.aio.server(options=options)
        servicer = OipServicer(dataplane, gate)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        old_umask = os.umask(0o117)
        try:
            self._server.add_insecure_port(f"unix:{self.socket_path}")
            host, port = self._tcp
            if port is not None:
                self.tcp_port = self._server.add_insecure_port(f"{host}:{port}")
            await self._server.start()
        finally:
            os.umask(old_umask)
        if self._group is not None:
            os.chown(self.socket_path, -1, self._group)

    async def stop(self, grace: float = 30.0) -> None:
        """Refuse new calls, let running ones finish within ``grace``, remove the socket."""
        await self._server.stop(grace)
        self.socket_path.unlink(missing_ok=True)
