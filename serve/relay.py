"""Relaying requests to a worker: keep-alive HTTP/1.1 over its Unix socket, bytes in, bytes out.

The router forwards every routed request to the model's worker. aiohttp's client did that
at ~75 µs of CPU per request (request and response objects, cookie jar, tracing, timeouts):
half of what routing cost. The worker is ours and always answers with a Content-Length, so
the relay only writes the request head and body, and reads back the status line, the
headers and exactly Content-Length bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

__all__ = ["RelayError", "WorkerLink"]

_MAX_HEAD = 64 * 1024
"""Longest response head accepted from a worker (aiohttp's default line limits are below)."""


class RelayError(ConnectionError):
    """The worker closed the connection or answered with something that is not HTTP/1.1."""


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class WorkerLink:
    """Connections to one worker, reused across requests; at most ``limit`` at a time."""

    def __init__(self, path: str, *, limit: int = 256) -> None:
        self.path = path
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(limit)

    async def request(
        self, method: str, target: str, body: bytes, headers: Iterable[tuple[str, str]] = ()
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request; return the worker's status, headers and body.

        A reused connection the worker has closed meanwhile (keep-alive expiry, or a
        restart) is noticed before any byte of the answer and the request is sent again
        on a fresh one; any other failure raises :class:`RelayError` (or ``OSError``).
        """
        lines = [f"{method} {target} HTTP/1.1", "Host: worker", f"Content-Length: {len(body)}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        async with self._slots:
            while self._idle:
                conn = self._idle.pop()
                try:
                    return await self._exchange(conn, head, body)
                except _StaleConnection:
                    continue
            conn = await asyncio.open_unix_connection(self.path, limit=_MAX_HEAD)
            try:
                return await self._exchange(conn, head, body)
            except _StaleConnection:
                raise RelayError("the worker closed the connection without answering") from None

    async def _exchange(
        self, conn: Connection, head: bytes, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        reader, writer = conn
        keep = False
        try:
            if len(body) < 65536:  # one write, one syscall
                writer.write(head + body)
            else:  # no copy of a large body
                writer.writelines((head, body))
            await writer.drain()
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _StaleConnection from None
                raise RelayError("the worker closed the connection mid-answer") from None
            except asyncio.LimitOverrunError:
                raise RelayError("the worker's answer has an oversized head") from None
            status, headers, length, keep = _parse_head(raw)
            try:
                payload = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                keep = False
                raise RelayError("the worker closed the connection mid-answer") from None
            return status, headers, payload
        except (ConnectionResetError, BrokenPipeError):
            raise _StaleConnection from None
        finally:
            if keep:
                self._idle.append(conn)
            else:
                writer.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _StaleConnection(Exception):
    """The connection was gone before any byte of the answer arrived."""


def _parse_head(raw: bytes) -> tuple[int, list[tuple[str, str]], int, bool]:
    """(status, headers, body length, connection reusable) from a response head."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise RelayError(f"the worker answered {lines[0][:40]!r}, not HTTP/1.1")
    try:
        status = int(rest[:3])
    except ValueError:
        raise RelayError(f"the worker answered {lines[0][:40]!r}") from None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    keep = version == "HTTP/1.1"
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        value = value.strip()
        key = name.lower()
        if key == "content-length":
            if not value.isdigit():
                raise RelayError(f"the worker answered Content-Length {value[:20]!r}")
            length = int(value)
        elif key == "transfer-encoding":
            raise RelayError("the worker answered without a Content-Length")
        elif key == "connection":
            keep = value.lower() == "keep-alive" or (keep and value.lower() != "close")
        headers.append((name, value))
    if length is None:
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        else:
            raise RelayError("the worker answered without a Content-Length")
    return status, headers, length, keep
