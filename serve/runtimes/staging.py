"""Safetensors to a GPU through pinned staging buffers, reading and copying overlapped.

``safetensors.torch.load_file(device="cuda")`` copies tensor by tensor from pageable memory:
the driver stages each copy through its own small pinned buffer and the host waits for every
one. Here the file's data section streams through two pinned buffers of ``chunk_bytes``: while
the GPU copies one buffer (asynchronously, on a side stream), the next part of the file is
read into the other. Each chunk is one ``preadv``; a tensor that spans chunks is copied piece
by piece into its byte view, so any tensor size works with fixed host memory.

The same code runs with ``device="cpu"`` (unpinned buffers, plain copies): that is how the
chunking is tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from pathlib import Path

import torch

__all__ = ["load_staged"]

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_CHUNK = 64 << 20
_lock = threading.Lock()
_pinned: list[torch.Tensor] = []
"""The process's two pinned buffers, kept between loads: pinning 128 MiB costs tens of
milliseconds. One staged load at a time per process (a worker serves one device)."""

_MAX_HEADER = 100 << 20
"""The format's own cap on the JSON header (safetensors refuses larger ones too)."""


def _header(fd: int, path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data section, tensor entries) from a safetensors file's header."""
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if length > _MAX_HEADER:
        raise ValueError(f"{path.name}: header of {length} bytes is not safetensors")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise ValueError(f"{path.name}: truncated header")
    entries = json.loads(raw)
    entries.pop("__metadata__", None)
    return 8 + length, entries


def load_staged(
    path: Path, device: str | torch.device, *, chunk_bytes: int = _CHUNK
) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path``, on ``device``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    fd = os.open(path, os.O_RDONLY)
    try:
        base, entries = _header(fd, path)
        size = os.fstat(fd).st_size
        tensors: dict[str, torch.Tensor] = {}
        spans: list[tuple[int, int, torch.Tensor]] = []  # file offsets -> destination bytes
        for name, entry in entries.items():
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{path.name}: tensor {name!r} has unknown dtype {entry['dtype']}")
            begin, end = (base + int(x) for x in entry["data_offsets"])
            tensor = torch.empty(entry["shape"], dtype=dtype, device=device)
            if end - begin != tensor.numel() * tensor.element_size() or end > size:
                raise ValueError(f"{path.name}: tensor {name!r} has wrong data offsets")
            tensors[name] = tensor
            if end > begin:
                spans.append((begin, end, tensor.reshape(-1).view(torch.uint8)))
        spans.sort(key=lambda s: s[0])
        with _lock:
            _stream(fd, spans, _buffers(chunk_bytes, cuda), device)
        return tensors
    finally:
        os.close(fd)


def _buffers(chunk_bytes: int, pinned: bool) -> list[torch.Tensor]:
    """Two staging buffers: the process's pinned pair for GPU loads, fresh ones otherwise."""
    if not pinned:
        return [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(2)]
    if not _pinned or _pinned[0].numel() != chunk_bytes:
        _pinned[:] = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in "ab"]
    return _pinned


def _stream(
    fd: int,
    spans: list[tuple[int, int, torch.Tensor]],
    buffers: list[torch.Tensor],
    device: torch.device,
) -> None:
    """Read the file range the spans cover, a buffer at a time, into their destinations."""
    if not spans:
        return
    cuda = device.type == "cuda"
    chunk_bytes = buffers[0].numel()
    views = [memoryview(b.numpy()) for b in buffers]
    stream = torch.cuda.Stream(device) if cuda else None
    done: list[torch.cuda.Event | None] = [None, None]
    pos, stop = spans[0][0], max(end for _, end, _ in spans)
    first = 0  # index of the first span that may still overlap the chunk
    slot = 0
    while pos < stop:
        length = min(chunk_bytes, stop - pos)
        if (event := done[slot]) is not None:
            event.synchronize()  # the GPU has finished copying out of this buffer
        _read_full(fd, views[slot][:length], pos)
        buffer = buffers[slot]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            i = first
            while i < len(spans) and spans[i][0] < pos + length:
                begin, end, dest = spans[i]
                lo, hi = max(begin, pos), min(end, pos + length)
                if lo < hi:
                    piece = buffer[lo - pos : hi - pos]
                    dest[lo - begin : hi - begin].copy_(piece, non_blocking=cuda)
                if end <= pos + length and i == first:
                    first += 1
                i += 1
            if stream is not None:
                done[slot] = torch.cuda.Event()
                done[slot].record(stream)
        pos += length
        slot ^= 1
    if stream is not None:
        stream.synchronize()


def _read_full(fd: int, view: memoryview, offset: int) -> None:
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise ValueError(f"file ended at byte {offset}, before its tensors' data")
        view, offset = view[got:], offset + got
