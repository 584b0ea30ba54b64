"""What one peer may cost a server, and a Unix socket that stays where clients look for it.

aiohttp's server waits for a request head and body as long as the peer likes (its only
bound is a one-hour keep-alive timer), and reads a body that announces more than the
limit until the limit is reached. A pod on the node could hold connections and memory that
way. The pieces here bound both; ``nodecache.serve.http.NodeServer`` puts them together, for the
node socket's app and the router's alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_urldispatcher import Handler

from nodecache.serve.peers import boot_seconds
from nodecache.serve.settings import TransportLimits

__all__ = [
    "READY_PATH",
    "LimitedProtocol",
    "SocketTaken",
    "TransportLimits",
    "UnixListener",
    "limits_middleware",
]

log = logging.getLogger(__name__)
READY_PATH = "/v2/health/ready"


class SocketTaken(RuntimeError):
    """Another process serves on the socket path, or something else than a socket is there."""


_TIMEOUT_BODY = b'{"error":"the request head did not arrive in time"}'
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\nConnection: close\r\n\r\n"
) + _TIMEOUT_BODY


class LimitedProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with a deadline for each request head.

    The deadline starts when the connection opens and, later, with the first byte of
    each head; it ends when aiohttp's parser has the whole head. Bytes of a head that
    arrive while the previous answer is still being written are bounded by the
    keep-alive timeout instead. Relies on two attributes aiohttp has had since 3.0:
    ``_waiter`` (set while the connection waits for a head) and ``_messages`` (parsed
    heads not yet handled).
    """

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: object) -> None:
        super().__init__(manager, **kwargs)  # type: ignore[arg-type]
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted = boot_seconds()  # a caller's process must be older (serve.peers)
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:  # a whole head arrived (or a malformed one, answered 400)
            self._disarm()
        elif self._waiting_for_head() and data and self._header_timer is None:
            self._arm()

    def _waiting_for_head(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    def _arm(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is None or not self._waiting_for_head():
            return  # the head arrived and a request is being answered
        self.transport.write(_TIMEOUT_ANSWER)
        self.force_close()


def limits_middleware(limits: TransportLimits, socket_present: Callable[[], bool]) -> object:
    """The outermost middleware: bodies over the app's ``client_max_size`` are refused
    with 413 before a byte of them is read; a body must arrive within the body timeout
    (it is read here, so handlers find it complete); readiness says no while the node
    socket is missing."""

    @web.middleware
    async def transport_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = await _receive_body(request, limits.body_timeout)
        if refusal is not None:
            return refusal
        if request.path == READY_PATH and not socket_present():
            return web.json_response(
                {"error": "the node socket is missing; it is being created again"}, status=503
            )
        return await handler(request)

    return transport_limits


async def _receive_body(request: web.Request, timeout: float) -> web.Response | None:
    """None once the whole body is here (or there is none), else the answer refusing it."""
    if not request.body_exists:
        return None
    limit = request.client_max_size
    length = request.content_length
    if limit and length is not None and length > limit:
        return _refuse(
            413, f"the request body of {length} bytes is larger than the {limit} byte limit"
        )
    if request.content.is_eof():  # arrived with the head: nothing to wait for
        return None
    try:
        async with asyncio.timeout(timeout):
            await request.read()
    except TimeoutError:
        return _refuse(408, f"the request body did not arrive within {timeout:g} s")
    except web.HTTPRequestEntityTooLarge:
        return _refuse(413, f"the request body is larger than the {limit} byte limit")
    except RequestPayloadError as exc:  # malformed chunked encoding, or cut short
        return _refuse(400, f"the request body is malformed: {exc}")
    return None


def _refuse(status: int, message: str) -> web.Response:
    """An OIP error that also closes the connection: the rest of the body is not read."""
    response = web.json_response({"error": message}, status=status)
    response.force_close()
    return response


class UnixListener:
    """A listening Unix socket, mode 0660 from the first instant, that is bound again if
    its file is deleted (a node clean-up script, a mistaken ``rm``): clients find it by
    path, and a deleted path answers nothing while the agent would still look healthy."""

    def __init__(
        self,
        path: Path,
        protocol: Callable[[], asyncio.Protocol],
        *,
        group: int | None = None,
        backlog: int = 4096,
    ) -> None:
        self.path = path
        self._protocol = protocol
        self._group = group
        self._backlog = backlog
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._reported: str | None = None

    async def bind(self) -> None:
        """Listen on the path (its folder created), refusing to steal a live socket."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask is the process's: set only around the bind itself, never across an
        # await (other tasks would create their files under it).
        old_umask = os.umask(0o117)
        try:
            sock.bind(str(self.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        try:
            # A deep backlog: a burst of clients gets answers (503 at worst), not resets.
            server = await asyncio.get_running_loop().create_unix_server(
                self._protocol, sock=sock, backlog=self._backlog
            )
        except BaseException:
            sock.close()
            raise
        if self._group is not None:
            os.chown(self.path, -1, self._group)
        st = os.stat(self.path)
        if self._server is not None:
            self._server.close()  # its file is gone: no client can reach it any more
        self._server, self._inode = server, (st.st_dev, st.st_ino)

    def present(self) -> bool:
        """Whether the path still is the socket this listener bound."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    async def keep(self, every: float) -> None:
        """Check the path every ``every`` seconds; bind again when it is gone. Runs until
        cancelled."""
        while True:
            await asyncio.sleep(every)
            if self.present():
                self._reported = None
                continue
            try:
                await self.bind()
            except (OSError, RuntimeError) as exc:
                self._report(f"cannot create the node socket again: {exc}")
            else:
                log.warning(
                    "node socket was removed; created it again", extra={"socket": str(self.path)}
                )
                self._reported = None

    def _report(self, problem: str) -> None:
        if problem != self._reported:
            log.error(problem, extra={"socket": str(self.path)})
            self._reported = problem

    def close(self) -> None:
        """Stop listening; remove the file if it still is ours (never another's)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.present():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a killed agent, but never steal a live one, and never
    remove what is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketTaken(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketTaken(f"another process is already serving on {path}")
