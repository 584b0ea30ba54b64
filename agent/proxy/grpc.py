"""The proxy's gRPC side: ``inference.GRPCInferenceService`` from a TCP port to the node's
gRPC socket, message bytes in, message bytes out.

Messages are never decoded: the model's name is field 1 of every request and answer that
carries one, and it is found by walking the top-level fields and spliced (see
:mod:`.names`), so a tensor payload is copied once and never parsed. One HTTP/2 channel to
the node socket carries every call (gRPC multiplexes them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from nodecache.agent.proxy.names import (
    SHARED_MEMORY_REFUSED,
    BadMessage,
    Names,
    field_one,
    replace_field_one,
)
from nodecache.serve.grpc import grpc_service_pb2 as pb

__all__ = ["MAX_MESSAGE", "GrpcProxy"]

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
MAX_MESSAGE = 64 * 1024 * 1024
_FORWARDED_METADATA = frozenset({"traceparent", "tracestate", "x-request-id"})
_TRUE = b"\x08\x01"  # {ready: true} / {live: true}: field 1, varint 1
Handler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


class GrpcProxy:
    """Calls about the served model go to the node under the cache's name; health is
    answered here; the repository is not reachable through a proxy of one model."""

    def __init__(self, names: Names, socket_path: Path, *, max_message: int = MAX_MESSAGE) -> None:
        self.names = names
        self.socket_path = socket_path
        options = [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
        self._channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=options)
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._server = grpc.aio.server(options=options)
        handlers: dict[str, Handler] = {
            "ServerLive": self._live,
            "ServerReady": self._ready,
            "ServerMetadata": self._passed("ServerMetadata"),
            "ModelReady": self._renamed("ModelReady", answer_named=False),
            "ModelMetadata": self._renamed("ModelMetadata", answer_named=True),
            "ModelInfer": self._renamed("ModelInfer", answer_named=True),
            # Triton's extensions, which perf_analyzer asks first: small answers naming the
            # model inside a sub-message, so they are decoded and renamed.
            "ModelConfig": self._renamed("ModelConfig", answer_named=False, nested=_config_name),
            "ModelStatistics": self._renamed(
                "ModelStatistics", answer_named=False, nested=_statistics_names
            ),
            "RepositoryModelLoad": self._no_repository,
            "RepositoryModelUnload": self._no_repository,
        }
        rpcs = {name: grpc.unary_unary_rpc_method_handler(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, rpcs),)
        )

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (empty host: every address); returns the port."""
        bound = self._server.add_insecure_port(f"{host or '[::]'}:{port}")
        await self._server.start()
        return bound

    async def stop(self, grace: float = 5.0) -> None:
        await self._server.stop(grace)
        await self._channel.close()

    # -- handlers ------------------------------------------------------------------------

    async def _live(self, _: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return _TRUE

    async def _ready(self, _: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Ready when the node socket answers and the model is ready there."""
        request = replace_field_one(b"", None, self.names.model)
        try:
            answer = await self._node("ModelReady", request, context)
        except grpc.aio.AioRpcError as exc:
            if _unreachable(exc):
                await self._abort_for(exc, context)
            return b""  # the node answered: the model is not ready
        return _TRUE if answer == _TRUE else b""

    def _passed(self, method: str) -> Handler:
        async def passed(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._call(method, request, context)

        return passed

    def _renamed(
        self,
        method: str,
        *,
        answer_named: bool,
        nested: Callable[[bytes, str, str], bytes] | None = None,
    ) -> Handler:
        """A call naming the model in field 1, renamed on the way in and, when the answer
        names it too (at its top level, or deeper: ``nested``), on the way out."""

        async def renamed(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                where = field_one(request)
            except BadMessage as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
            asked = "" if where is None else bytes(request[where[1] : where[2]]).decode(
                "utf-8", "replace"
            )  # fmt: skip
            if asked != self.names.served:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"model {asked[:100]!r} is not served here; this endpoint serves "
                    f"{self.names.served!r}",
                )
            if method == "ModelInfer" and b"shared_memory_region" in request:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, SHARED_MEMORY_REFUSED)
            if not self.names.same:
                request = replace_field_one(request, where, self.names.model)
            answer = await self._call(method, request, context)
            if nested is not None and not self.names.same:
                return nested(answer, self.names.model, self.names.served)
            if answer_named and not self.names.same:
                try:
                    where = field_one(answer)
                except BadMessage:
                    return answer
                if where is not None and answer[where[1] : where[2]] == self.names.model.encode():
                    answer = replace_field_one(answer, where, self.names.served)
            return answer

        return renamed

    async def _no_repository(self, _: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"this endpoint serves one model ({self.names.served!r}); the model repository is "
            "reached through the node socket",
        )
        raise AssertionError("abort raises")

    async def _call(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """One call to the node; its error, if any, becomes this call's, unchanged."""
        try:
            return await self._node(method, request, context)
        except grpc.aio.AioRpcError as exc:
            await self._abort_for(exc, context)
            raise AssertionError("abort raises") from None

    async def _node(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = tuple(
            (k, v) for k, v in context.invocation_metadata() or () if k in _FORWARDED_METADATA
        )
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self._channel.unary_unary(f"/{SERVICE}/{method}")
        answer: bytes = await call(request, metadata=metadata, timeout=context.time_remaining())
        return answer

    async def _abort_for(
        self, exc: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext
    ) -> None:
        details = exc.details() or ""
        if _unreachable(exc):
            where = {"socket": str(self.socket_path), "error": details}
            log.warning("node gRPC socket does not answer", extra=where)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the node socket {self.socket_path} does not answer ({details}); is "
                "the nodecache agent running on this node and the socket volume mounted?",
            )
        await context.abort(exc.code(), details)


def _unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """The node's socket could not be reached (not: the node answered UNAVAILABLE)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "")


def _config_name(answer: bytes, model: str, served: str) -> bytes:
    """A ModelConfigResponse whose configuration is named as the client knows the model."""
    try:
        message = pb.ModelConfigResponse.FromString(answer)
    except DecodeError:
        return answer
    if message.config.name == model:
        message.config.name = served
    return message.SerializeToString()


def _statistics_names(answer: bytes, model: str, served: str) -> bytes:
    """A ModelStatisticsResponse whose entries for the model carry the client's name."""
    try:
        message = pb.ModelStatisticsResponse.FromString(answer)
    except DecodeError:
        return answer
    for entry in message.model_stats:
        if entry.name == model:
            entry.name = served
    return message.SerializeToString()
