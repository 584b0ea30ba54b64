"""``inference.GRPCInferenceService`` over the same dataplane as REST.

Tensors arrive typed (``contents``) or raw (``raw_input_contents``); answers are
always raw (``raw_output_contents``), as Triton does and every OIP client reads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

from nodecache.serve.dataplane import DataPlane
from nodecache.serve.errors import CallerUnknown, InvalidInput, ServeError, excerpt
from nodecache.serve.grpc import grpc_service_pb2 as pb
from nodecache.serve.grpc import grpc_service_pb2_grpc as pb_grpc
from nodecache.serve.peers import Peer, peer_of_grpc
from nodecache.serve.protocol import (
    DEFAULT_MAX_ELEMENTS,
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedRef,
    shared_ref,
    sized_work,
    tensor_bytes,
)
from nodecache.serve.tensors import decode_tensor, encode_tensor
from nodecache.serve.triton.shm import Lookup, open_region

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
    shared: dict[str, SharedRef] = {}
    carried = []  # inputs whose bytes are in the message (Triton: raw for these only)
    for tensor in request.inputs:
        ref = shared_ref(_parameters(tensor.parameters), f"input {excerpt(tensor.name)}")
        if ref is None:
            carried.append(tensor)
        elif tensor.name in shared:
            raise InvalidInput(f"input {excerpt(tensor.name)} is given twice")
        else:
            shared[tensor.name] = replace(ref, datatype=tensor.datatype, shape=list(tensor.shape))
    if raw and len(raw) != len(carried):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(carried)} inputs"
            + (" outside shared memory" if shared else "")
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(carried):
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
    outputs = [
        RequestedOutput(
            o.name, True, shared_ref(_parameters(o.parameters), f"output {excerpt(o.name)}")
        )
        for o in request.outputs
    ] or None
    return InferRequest(
        inputs=inputs,
        id=request.id or None,
        parameters=_parameters(request.parameters),
        outputs=outputs,
        binary_outputs=True,
        shared=shared,
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
    for name, placed in result.placed.items():  # in shared memory: described, no bytes
        response.outputs.add(name=name, datatype=placed["datatype"], shape=placed["shape"])
        response.raw_output_contents.append(b"")
    return response


_MAX_PEERS = 4096
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
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        # Our TCP ports: a loopback caller is the process at the other end of one of them.
        self.ports: set[int] = set()
        # Callers found by their peer address (a walk of /proc), while they hold the socket.
        self._peers: dict[str, Peer] = {}

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
        ready = self.dataplane.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @_answers
    async def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]
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
        infer_request = await sized_work(request.ByteSize(), decode_infer_request, request)
        infer = self.dataplane.infer
        if infer_request.uses_shared_memory:
            infer_request.regions = await self._regions(context)
            infer = self.dataplane.infer_shared
        result = await infer(
            request.model_name, infer_request, request.model_version or None, protocol="grpc"
        )
        return await sized_work(tensor_bytes(result.outputs), encode_infer_response, result)

    @_answers
    async def RepositoryModelLoad(self, request, context):  # type: ignore[no-untyped-def]
        name = _repository_model(request)
        await self.dataplane.load(name)
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(self, request, context):  # type: ignore[no-untyped-def]
        name = _repository_model(request)
        await self.dataplane.unload(name)
        return pb.RepositoryModelUnloadResponse()

    # -- Triton's extensions (serve/triton/) -------------------------------------------

    @_answers
    async def ModelConfig(self, request, context):  # type: ignore[no-untyped-def]
        config = await self.dataplane.model_config(request.name, request.version or None)
        # The same JSON as REST's, read into model_config.proto's message.
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    @_answers
    async def ModelStatistics(self, request, context):  # type: ignore[no-untyped-def]
        if not request.name and request.version:
            raise InvalidInput("a version needs a model name")
        report = await self.dataplane.model_statistics(
            request.name or None, request.version or None
        )
        return json_format.ParseDict(report, pb.ModelStatisticsResponse())

    async def _peer(self, context: grpc.aio.ServicerContext) -> Peer:
        peer = context.peer()
        caller = self._peers.get(peer)
        if caller is not None and caller.holds_socket():
            return caller
        caller = await asyncio.to_thread(peer_of_grpc, peer, self.ports)
        if caller is not None:
            if len(self._peers) >= _MAX_PEERS:
                self._peers.clear()
            self._peers[peer] = caller
        if caller is None:
            raise CallerUnknown(
                "shared memory is the calling process's own, and this connection does not "
                "say which process calls: use gRPC over TCP on loopback, or HTTP on the "
                "node socket"
            )
        return caller

    async def _regions(self, context: grpc.aio.ServicerContext) -> Lookup:
        return self.dataplane.shared_memory.lookup(await self._peer(context))

    @_answers
    async def SystemSharedMemoryRegister(self, request, context):  # type: ignore[no-untyped-def]
        caller = await self._peer(context)
        region = await asyncio.to_thread(
            open_region, caller, request.name, request.key, request.offset, request.byte_size
        )
        self.dataplane.shared_memory.add(region)
        return pb.SystemSharedMemoryRegisterResponse()

    @_answers
    async def SystemSharedMemoryStatus(self, request, context):  # type: ignore[no-untyped-def]
        caller = await self._peer(context)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.dataplane.shared_memory.status(caller, request.name or None):
            response.regions[region["name"]].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region)
            )
        return response

    @_answers
    async def SystemSharedMemoryUnregister(self, request, context):  # type: ignore[no-untyped-def]
        caller = await self._peer(context)
        self.dataplane.shared_memory.unregister(caller, request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()


def _repository_model(request: Any) -> str:
    """The model a repository load or unload names: Triton's clients send ``model_name``
    (field 2); KServe's proto has it as field 1, which Triton's calls ``repository_name``."""
    return str(request.model_name or request.repository_name)


def _unimplemented(method: str) -> Callable[..., Awaitable[Any]]:
    async def refuse(self: OipServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"nodecache does not serve {method}")

    return refuse


# Triton's service has more than nodecache serves (CUDA shared memory, streaming, tracing,
# log settings): those answer UNIMPLEMENTED, as gRPC says of an unknown method.
for _method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _method not in OipServicer.__dict__:
        setattr(OipServicer, _method, _unimplemented(_method))


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
        self._servicer = OipServicer(dataplane)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, self._server)

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        # The umask is the process's: set only around the bind itself (add_insecure_port
        # binds), never across an await (other tasks would create their files under it).
        old_umask = os.umask(0o117)
        try:
            self._server.add_insecure_port(f"unix:{self.socket_path}")
        finally:
            os.umask(old_umask)
        host, port = self._tcp
        if port is not None:
            self.tcp_port = self._server.add_insecure_port(f"{host}:{port}")
            self._servicer.ports.add(self.tcp_port)
        await self._server.start()
        if self._group is not None:
            os.chown(self.socket_path, -1, self._group)

    async def stop(self, grace: float = 30.0) -> None:
        """Refuse new calls, let running ones finish within ``grace``, remove the socket."""
        await self._server.stop(grace)
        self.socket_path.unlink(missing_ok=True)
