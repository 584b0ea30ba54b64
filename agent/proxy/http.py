"""The proxy's HTTP side: Open Inference Protocol REST (V2 and KServe V1) from a TCP port
to the node socket.

A request is parsed by llhttp (``httptools``, as the relay parses answers), its body kept
as the chunks that arrived and joined once, then relayed by :class:`WorkerLink` (pooled
keep-alive connections to the node socket; every byte it writes is checked). The answer is
written back with the model's name spliced in, never re-encoded. aiohttp's server would
cost more per request than everything else here together, which is why this is a small
protocol of its own: requests on one connection are answered in order (pipelining), a
head must arrive within ``header_timeout``, a body within ``body_timeout``, an idle
connection is closed after ``keepalive_timeout``, and a body over ``max_body`` is refused
with 413 before it is read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import logging
from dataclasses import dataclass, field
from typing import cast

import httptools
import orjson

from nodecache.agent.proxy.names import SHARED_MEMORY_REFUSED, Names, Route, names_shared_memory
from nodecache.serve.protocol import HEADER_LENGTH
from nodecache.serve.relay import RelayBusy, RelayError, UnsafeRequest, WorkerLink
from nodecache.serve.transport import TransportLimits

__all__ = ["HttpProxy"]

log = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024
"""Longest request head accepted (431 beyond)."""
_REQUEST_HEADERS = frozenset(
    {"content-type", "accept", HEADER_LENGTH.lower(), "traceparent", "tracestate", "x-request-id"}
)
"""What crosses to the node: the headers its OIP routes read, never hop-by-hop ones."""
_ANSWER_HEADERS = frozenset({"content-type", HEADER_LENGTH.lower(), "retry-after", "x-request-id"})
_RETRY_AFTER = "1"


@dataclass
class _Request:
    method: str
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    size: int = 0
    keep_alive: bool = True


@dataclass
class _Answer:
    status: int
    headers: list[tuple[str, str]]
    body: tuple[bytes | memoryview, ...]

    @classmethod
    def json(cls, status: int, doc: object, *extra: tuple[str, str]) -> _Answer:
        return cls(status, [("Content-Type", "application/json"), *extra], (orjson.dumps(doc),))

    @classmethod
    def error(cls, status: int, message: str, *extra: tuple[str, str]) -> _Answer:
        return cls.json(status, {"error": message}, *extra)


class HttpProxy:
    """What a request becomes: answered here (health), refused (4xx), or relayed."""

    def __init__(
        self,
        names: Names,
        node: WorkerLink,
        *,
        max_body: int,
        limits: TransportLimits | None = None,
    ) -> None:
        self.names = names
        self.node = node
        self.max_body = max_body
        self.limits = limits or TransportLimits()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (empty host: every address); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host or None, port, backlog=4096
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close()
        await self.node.close()

    async def answer(self, request: _Request) -> _Answer:
        method = request.method
        if method not in ("GET", "HEAD", "POST"):
            return _Answer.error(405, f"method {method[:16]} is not allowed here")
        path, _, query = request.url.decode("latin-1").partition("?")
        route = self.names.route(path, "?" + query if query else "")
        if route.kind == "node":
            return await self._relay(request, route)
        if route.kind == "live":
            return _Answer.json(200, {"live": True})
        if route.kind == "v1-live":
            return _Answer.json(200, {"status": "alive"})
        if route.kind == "v1-models":
            return _Answer.json(200, {"models": [self.names.served]})
        if route.kind == "ready":
            return await self._ready()
        if route.kind == "other-model":
            return _Answer.error(
                404, f"model {route.target[:100]!r} is not served here; this endpoint serves "
                f"{self.names.served!r}"
            )  # fmt: skip
        return _Answer.error(404, f"no route for {path[:100]!r} (this endpoint serves one "
                             f"model, {self.names.served!r})")  # fmt: skip

    async def _relay(self, request: _Request, route: Route) -> _Answer:
        body = request.body[0] if len(request.body) == 1 else b"".join(request.body)
        headers = [(k, v) for k, v in request.headers if k.lower() in _REQUEST_HEADERS]
        if names_shared_memory(body, headers):
            return _Answer.error(400, SHARED_MEMORY_REFUSED)
        method = "GET" if request.method == "HEAD" else request.method
        try:
            status, answer, payload = await self.node.request(method, route.target, body, headers)
        except UnsafeRequest as exc:
            return _Answer.error(400, str(exc))
        except RelayBusy as exc:
            return _Answer.error(503, str(exc), ("Retry-After", _RETRY_AFTER))
        except (OSError, RelayError) as exc:
            return self._node_down(exc)
        kept = [(k, v) for k, v in answer if k.lower() in _ANSWER_HEADERS]
        if status == 200 and route.renamed is not None:
            return self._renamed(kept, payload, route.renamed)
        return _Answer(status, kept, (payload,))

    def _renamed(self, headers: list[tuple[str, str]], payload: bytes, key: str) -> _Answer:
        """The node's answer with the served name where it said the cache's. With binary
        tensors only the JSON head before them changes, and its length header with it."""
        at = next((i for i, (k, _) in enumerate(headers) if k.lower() == HEADER_LENGTH.lower()),
                  None)  # fmt: skip
        head_end = len(payload)
        if at is not None:
            with contextlib.suppress(ValueError):
                head_end = min(len(payload), int(headers[at][1]))
        view = memoryview(payload)
        parts = self.names.rename_json(key, view[:head_end])
        if parts is None:
            return _Answer(200, headers, (payload,))
        if at is not None:
            headers[at] = (headers[at][0], str(sum(len(p) for p in parts)))
        return _Answer(200, headers, (*parts, view[head_end:]))

    async def _ready(self) -> _Answer:
        """Ready when the node socket answers and the model is ready there."""
        target = self.names.route(f"/v2/models/{self.names.served}/ready", "").target
        try:
            status, _, payload = await self.node.request("GET", target, b"")
        except RelayBusy as exc:
            return _Answer.error(503, str(exc), ("Retry-After", _RETRY_AFTER))
        except (OSError, RelayError) as exc:
            return self._node_down(exc)
        if status == 200:
            return _Answer.json(200, {"ready": True})
        try:
            reason = str(orjson.loads(payload).get("error", ""))
        except (orjson.JSONDecodeError, AttributeError):
            reason = ""
        message = f"model {self.names.model!r} is not ready on the node"
        return _Answer.error(503, f"{message}: {reason}" if reason else message)

    def _node_down(self, exc: BaseException) -> _Answer:
        log.warning("node socket does not answer", extra={"socket": self.node.path,
                                                           "error": str(exc)})  # fmt: skip
        return _Answer.error(
            503, f"the node socket {self.node.path} does not answer ({exc}); is the nodecache "
            "agent running on this node and the socket volume mounted?",
            ("Retry-After", _RETRY_AFTER),
        )  # fmt: skip


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order.

    Reading pauses while a request is answered, so a client can have at most what one read
    brought in waiting here. One deadline runs at a time: the head's, the body's, or the
    idle connection's; none while the node works on an answer."""

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.limits = proxy.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._current: _Request | None = None
        self._in_head = True
        self._head_bytes = 0
        self._queue: collections.deque[_Request] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._refusal_sent = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.proxy._connections.add(self)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # draining what the client still sends after a refusal
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and self._head_bytes > _MAX_HEAD:
            self._refuse(431, f"the request head is over {_MAX_HEAD} bytes")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.proxy._connections.discard(self)
        self._disarm()
        if self._task is not None:
            self._task.cancel()  # the relay drops its node connection, never pools it

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._current = _Request("")
        self._in_head, self._head_bytes = True, 0
        if self._task is None:
            self._arm_head()

    def on_url(self, url: bytes) -> None:
        assert self._current is not None
        self._current.url += url
        self._current.size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._current is not None
        self._current.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        self._current.size += len(name) + len(value)

    def on_headers_complete(self) -> None:
        request = self._current
        assert request is not None
        request.method = self._parser.get_method().decode("ascii", "replace")
        self._in_head = False
        if request.size > _MAX_HEAD:  # a whole head that came in one read
            self._refuse(431, f"the request head is over {_MAX_HEAD} bytes")
            raise httptools.HttpParserError("refused")  # stops the parser; caught above
        request.size = 0  # from here on: the body's
        if self._task is None:
            self._arm(self.limits.body_timeout, "the request body did not arrive in time")
        length = next((v for k, v in request.headers if k.lower() == "content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.proxy.max_body:
            self._too_large()
        expect = next((v for k, v in request.headers if k.lower() == "expect"), None)
        if expect is not None and expect.lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self._current
        assert request is not None
        request.size += len(body)
        if request.size > self.proxy.max_body:
            self._too_large()
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self._current
        assert request is not None
        request.keep_alive = self._parser.should_keep_alive()
        self._current = None
        self._disarm()
        self._queue.append(request)
        if self._transport is not None:
            self._transport.pause_reading()
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    def _too_large(self) -> None:
        self._refuse(413, f"request body is larger than the {self.proxy.max_body} byte limit")
        raise httptools.HttpParserError("refused")  # stops the parser; caught above

    # -- answering -----------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue and self._transport is not None:
                request = self._queue.popleft()
                try:
                    answer = await self.proxy.answer(request)
                except Exception:  # ours: the details go to the log, not to the client
                    path = request.url[:200].decode("latin-1")
                    log.exception("proxy error", extra={"path": path})
                    answer = _Answer.error(500, "internal error")
                self._write(answer, request.keep_alive, head_only=request.method == "HEAD")
                if not request.keep_alive:
                    self.close()
                    return
        finally:
            self._task = None
        if self._refusal is not None:
            self._send_refusal()
        elif self._transport is not None:
            self._transport.resume_reading()
            if self._current is None:
                self._arm(self.limits.keepalive_timeout, None)
            else:
                self._arm_head()

    def _write(self, answer: _Answer, keep_alive: bool, *, head_only: bool = False) -> None:
        if self._transport is None:
            return
        length = sum(len(part) for part in answer.body)
        lines = [f"HTTP/1.1 {answer.status} {_PHRASES.get(answer.status, '')}"]
        lines.extend(f"{k}: {v}" for k, v in answer.headers)
        lines.append(f"Content-Length: {length}")
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head_only:
            self._transport.write(head)
        elif length < 65536:  # one write, one syscall
            self._transport.write(b"".join((head, *answer.body)))
        else:  # no copy of a large body
            self._transport.writelines((head, *answer.body))

    # -- limits --------------------------------------------------------------------------

    def _arm_head(self) -> None:
        self._arm(self.limits.header_timeout, "the request head did not arrive in time")

    def _arm(self, seconds: float, late: str | None) -> None:
        """The one deadline: answer 408 saying ``late``, or (None) close an idle connection."""
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._expire, late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, late: str | None) -> None:
        self._timer = None
        if late is None:
            self.close()
        else:
            self._refuse(408, late)

    def _refuse(self, status: int, message: str) -> None:
        """A client mistake on this connection: answered after the answers owed (the first
        mistake only), then the connection closes, since the rest of its byte stream cannot
        be trusted."""
        if self._refusal is not None:
            return
        self._disarm()
        self._refusal = (status, message)
        if self._task is None:
            self._send_refusal()

    def _send_refusal(self) -> None:
        """What the client still sends is read and dropped for a moment, so that it sees
        the answer rather than a reset."""
        if self._refusal is None or self._refusal_sent or self._transport is None:
            return
        self._refusal_sent = True
        self._transport.resume_reading()
        self._write(_Answer.error(*self._refusal), keep_alive=False)
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._timer = self._loop.call_later(1.0, self.close)


_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
