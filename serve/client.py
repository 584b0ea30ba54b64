"""A small client for the node socket: what an inference pod (or `nodecache status`) uses."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np

from serve.protocol import HEADER_LENGTH
from serve.tensors import decode_tensor, encode_tensor

__all__ = ["ClientError", "NodeClient"]


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
        specs, chunks = [], []
        for name, array in inputs.items():
            spec, raw = encode_tensor(name, np.asarray(array), binary=binary)
            specs.append(spec)
            if raw is not None:
                chunks.append(raw)
        doc: dict[str, Any] = {"inputs": specs}
        if binary:
            doc["parameters"] = {"binary_data_output": True}
        header = json.dumps(doc).encode()
        headers = {"Content-Type": "application/json"}
        if binary:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
        async with self._session.post(
            f"/v2/models/{model}/infer", data=header + b"".join(chunks), headers=headers
        ) as resp:
            if resp.status != 200:
                await _json_or_raise(resp)
            body = await resp.read()
            length = resp.headers.get(HEADER_LENGTH)
        return _decode_outputs(body, int(length) if length else None)


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
    header = body if json_length is None else body[:json_length]
    raw = memoryview(body)[len(header) :]
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in json.loads(header)["outputs"]:
        size = spec.get("parameters", {}).get("binary_data_size")
        chunk = None
        if size is not None:
            chunk, offset = raw[offset : offset + size], offset + size
        name, array = decode_tensor(spec, chunk)
        outputs[name] = array
    return outputs
