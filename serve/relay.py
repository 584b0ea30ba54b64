"""Relaying requests to a worker: keep-alive HTTP/1.1 over its Unix socket, bytes in, bytes out.

The router forwards every routed request to the model's worker. aiohttp's client did that
at ~75 µs of CPU per request (request and response objects, cookie jar, tracing, timeouts):
half of what routing cost. So the relay writes the request head itself and reads the
answer with llhttp (through ``httptools``, the parser uvicorn uses), a C parser that
costs about 2 µs per answer; h11 would cost ~100 µs here.

Nothing a caller sends is trusted on this hop: the method, target and every header are
checked before a byte is written (no CR, LF, space or non-ASCII can reach the request
line), interim 1xx answers are skipped, and a connection goes back to the pool only
when exactly one whole answer arrived on it and the worker wants to keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable
from typing import cast

import httptools

__all__ = ["RelayBusy", "RelayError", "UnsafeRequest", "WorkerLink"]

_MAX_HEAD = 64 * 1024
"""Longest response head accepted from a worker."""

METHODS = frozenset({"GET", "POST"})
"""The methods the worker serves; HEAD is relayed as GET by the router (aiohttp then
drops the body), so the relay never waits for a body that HEAD never gets."""

_TARGET = re.compile(r"/[\x21-\x7e]*")
"""An origin-form target: visible ASCII only, so no space, CR, LF or control byte."""
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""A header name (RFC 9110 token)."""
_VALUE = re.compile(r"[\x20-\x7e\t]*")
"""A header value a worker may receive: visible ASCII, spaces and tabs."""


class RelayError(ConnectionError):
    """The worker closed the connection or answered with something that is not HTTP/1.1."""


class RelayBusy(RuntimeError):
    """Every connection to the worker is in use: the caller should answer 503, not queue."""


class UnsafeRequest(ValueError):
    """A method, target or header that cannot be written to the worker as it is."""


Answer = tuple[int, list[tuple[str, str]], bytes]


def request_head(
    method: str, target: str, length: int, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """The request head for the worker, or :class:`UnsafeRequest` if any part of it
    could change the request line or add a header."""
    if method not in METHODS:
        raise UnsafeRequest(f"method {method[:16]!r} is not relayed")
    if not _TARGET.fullmatch(target):
        raise UnsafeRequest("the request target has characters outside visible ASCII")
    lines = [f"{method} {target} HTTP/1.1", "Host: worker", f"Content-Length: {length}"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise UnsafeRequest(f"header name {name[:40]!r} is not a token")
        if not _VALUE.fullmatch(value):
            raise UnsafeRequest(f"header {name} has characters outside visible ASCII")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class WorkerLink:
    """Connections to one worker, reused across requests; at most ``limit`` at a time.

    When all ``limit`` are busy a request fails at once with :class:`RelayBusy` rather than
    waiting: a worker that stopped answering must not grow an unbounded queue here."""

    def __init__(self, path: str, *, limit: int = 256) -> None:
        self.path = path
        self._idle: list[_Connection] = []
        self._limit = limit
        self._busy = 0

    async def request(
        self, method: str, target: str, body: bytes, headers: Iterable[tuple[str, str]] = ()
    ) -> Answer:
        """Send one request; return the worker's status, headers and body.

        A reused connection the worker has closed meanwhile (keep-alive expiry, or a
        restart) is noticed before any byte of the answer and the request is sent again
        on a fresh one; any other failure raises :class:`RelayError` (or ``OSError``).
        """
        head = request_head(method, target, len(body), headers)
        if self._busy >= self._limit:
            raise RelayBusy(f"all {self._limit} connections to the worker are busy")
        self._busy += 1
        try:
            while self._idle:
                conn = self._idle.pop()
                try:
                    return await self._exchange(conn, head, body)
                except _StaleConnection:
                    continue
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_unix_connection(_Connection, self.path)
            try:
                return await self._exchange(conn, head, body)
            except _StaleConnection:
                raise RelayError("the worker closed the connection without answering") from None
        finally:
            self._busy -= 1

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> Answer:
        reusable = False
        try:
            answer = await conn.exchange(head, body)
            reusable = conn.reusable
            return answer
        finally:
            # Cancelled, failed, or an answer the worker wants closed: never pooled.
            if reusable:
                self._idle.append(conn)
            else:
                conn.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(OSError):
                await conn.closed


class _StaleConnection(Exception):
    """The connection was gone before any byte of the answer arrived."""


class _Connection(asyncio.Protocol):
    """One connection to a worker; one exchange at a time, answers parsed by llhttp."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._received = 0
        self._head = 0
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._done = False
        self.reusable = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- the exchange --------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes) -> Answer:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise _StaleConnection
        self._waiter = asyncio.get_running_loop().create_future()
        self._received, self._done, self.reusable = 0, False, False
        if len(body) < 65536:  # one write, one syscall
            transport.write(head + body)
        else:  # no copy of a large body
            transport.writelines((head, body))
        return await self._waiter

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the connection's state is unknown from here on.
            self._fail(RelayError("the worker sent bytes outside an answer"))
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(RelayError(f"the worker's answer is not valid HTTP/1.1: {exc}"))
            return
        except httptools.HttpParserUpgrade:
            self._fail(RelayError("the worker switched protocols"))
            return
        if not self._done and self._head == 0 and self._received > _MAX_HEAD:
            self._fail(RelayError("the worker's answer has an oversized head"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.reusable = False
        if not self.closed.done():
            self.closed.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            if self._received == 0:
                self._waiter.set_exception(_StaleConnection())
            else:
                self._waiter.set_exception(
                    RelayError("the worker closed the connection mid-answer")
                )

    def _fail(self, error: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:  # a second answer to one request: never trust this connection
            raise httptools.HttpParserError("more than one answer")
        self._head, self._status, self._headers, self._body = 0, 0, [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._head = 1
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:
            return  # interim (100 Continue, 103 Early Hints): the final answer follows
        self._done = True
        self.reusable = self._parser.should_keep_alive()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result((self._status, self._headers, body))
