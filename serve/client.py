"""A small client for the node socket: what an inference pod (or `nodecache status`) uses."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np

from nodecache.serve.protocol import HEADER_LENGTH, InferRequest, decode_response, encode_request

__all__ = ["ClientError", "NodeClient", "SyncNodeClient"]


class ClientError(Exception):
    """The server answered with an error; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class NodeClient:
    """Async OIP v2 client over a Unix socket (or TCP with ``base_url``)."""

    def __init__(
        self,
        socket_path: Path | str | None = None,
        *,
        base_url: str = "http://localhost",
        timeout: float = 60.0,
    ) -> None:
        connector = aiohttp.UnixConnector(path=str(socket_path)) if socket_path else None
        self._session = aiohttp.ClientSession(
            base_url=base_url,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def get(self, path: str) -> Any:
        async with self._session.get(path) as resp:
            return await _json_or_raise(resp)

    async def post(self, path: str, body: Any = None) -> Any:
        async with self._session.post(path, json=body) as resp:
            return await _json_or_raise(resp)

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, binary: bool = False
    ) -> dict[str, np.ndarray]:
        """Run one inference; ``binary`` sends and asks for raw tensor bytes."""
        body, headers = _infer_body(inputs, binary)
        async with self._session.post(
            f"/v2/models/{model}/infer", data=body, headers=headers
        ) as resp:
            if resp.status != 200:
                await _json_or_raise(resp)
            payload = await resp.read()
            length = resp.headers.get(HEADER_LENGTH)
        return _decode_outputs(payload, int(length) if length else None)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class SyncNodeClient:
    """The same client for code without an event loop (one keep-alive connection)."""

    def __init__(self, socket_path: Path | str, *, timeout: float = 60.0) -> None:
        self._conn = _UnixConnection(str(socket_path), timeout)

    def __enter__(self) -> SyncNodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        self._conn.request(method, path, body=body, headers=headers)
        resp = self._conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()

    def get(self, path: str) -> Any:
        return _json_or_error(*self._request("GET", path, None, {}))

    def post(self, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        return _json_or_error(
            *self._request("POST", path, data, {"Content-Type": "application/json"})
        )

    def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, binary: bool = False
    ) -> dict[str, np.ndarray]:
        body, headers = _infer_body(inputs, binary)
        status, resp_headers, payload = self._request(
            "POST", f"/v2/models/{model}/infer", body, headers
        )
        if status != 200:
            _json_or_error(status, resp_headers, payload)
        length = {k.lower(): v for k, v in resp_headers.items()}.get(HEADER_LENGTH.lower())
        return _decode_outputs(payload, int(length) if length else None)


def _infer_body(inputs: dict[str, np.ndarray], binary: bool) -> tuple[bytes, dict[str, str]]:
    body, json_length = encode_request(InferRequest(inputs=inputs), binary=binary)
    if json_length is None:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_length)}


def _json_or_error(status: int, headers: dict[str, str], payload: bytes) -> Any:
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = {"error": payload[:500].decode(errors="replace")}
    if status >= 400:
        raise ClientError(status, doc.get("error", "") if isinstance(doc, dict) else str(doc))
    return doc


async def _json_or_raise(resp: aiohttp.ClientResponse) -> Any:
    try:
        doc = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        doc = {"error": (await resp.text())[:500]}
    if resp.status >= 400:
        message = doc.get("error", "") if isinstance(doc, dict) else str(doc)
        raise ClientError(resp.status, message)
    return doc


def _decode_outputs(body: bytes, json_length: int | None) -> dict[str, np.ndarray]:
    return decode_response(body, json_length).outputs
