"""Triton's system shared memory extension: tensors read from and written to POSIX shared
memory (``/dev/shm/<key>``) that the caller created, instead of crossing the socket.

A region is the caller's own: it is registered under the caller's scope (its pod, or its
user outside pods: ``peers.Peer``), and its key is opened in the caller's own
``/dev/shm`` (through ``/proc/<pid>/root``), so one pod can neither name nor reach another
pod's memory. Keys are single names (no ``/`` inside, no ``..``): nothing outside
/dev/shm can be opened. Every offset and size is checked against the region before a byte
is touched, and the file's size against the region's end on every use. A region goes when
its caller unregisters it or when the process that registered it is gone.

The process that registers a region holds its file open; the process that runs the model
reads and writes it (``RegionFile``): the agent itself in-process, or the model's worker,
which opens the agent's descriptor through ``/proc/<agent>/fd/<n>``, so tensor bytes never
pass through the agent.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Any, Protocol

import numpy as np

from nodecache.serve.errors import InvalidInput, excerpt
from nodecache.serve.peers import Peer
from nodecache.serve.protocol import InferRequest, InferResponse, SharedRef
from nodecache.serve.tensors import DATATYPES, datatype_of, decode_tensor, encode_tensor

__all__ = [
    "MAX_BYTES_INPUT",
    "MAX_NODE_REGIONS",
    "MAX_REGIONS",
    "Region",
    "RegionFile",
    "RequestRegions",
    "SharedMemory",
    "WorkerRegions",
    "node_region_limit",
    "open_region",
    "place_outputs",
    "refs_of",
    "resolve_inputs",
]

# A key names one file of /dev/shm, with or without shm_open's leading slash.
_KEY = re.compile(r"/?([A-Za-z0-9_.-]{1,255})")
_NAME = re.compile(r"[!-~]{1,255}")  # a region's name: visible ASCII
MAX_REGIONS = 256
"""Regions one scope may hold at once."""
MAX_NODE_REGIONS = 4096
"""Regions the node holds at once, all scopes together: a constant, not a flag, because the
bound that matters is the agent's descriptors (``node_region_limit``), not a policy."""
MAX_BYTES_INPUT = 64 * 1024 * 1024
"""The most bytes a BYTES input may take in shared memory: what a request body may carry."""
SWEEP_SECONDS = 5.0
"""How often regions of callers that are gone are looked for."""


def _checked_key(key: Any) -> str:
    match = _KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None or match.group(1) in (".", ".."):
        raise InvalidInput(
            f"shared memory key {excerpt(str(key))} must name one file of /dev/shm "
            "(letters, digits, . _ -, an optional leading /)"
        )
    return match.group(1)


def _checked_size(what: str, value: Any) -> int:
    if type(value) is not int or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, got {excerpt(str(value))}")
    return value


class RegionFile:
    """A region's bytes in its open file, read and written with ``preadv``/``pwrite``.

    Not ``mmap``: a caller that shrinks its file under a mapping would make the reading
    process fault (SIGBUS) and die; a read of a shrunken file is only short, and refused.
    One copy, straight into the tensor's array, and never through a socket."""

    def __init__(self, fd: int, offset: int, byte_size: int) -> None:
        self.fd, self.offset, self.byte_size = fd, offset, byte_size

    def _check(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise InvalidInput(
                f"{what}: {size} bytes at offset {offset} do not fit the region's "
                f"{self.byte_size} bytes"
            )

    def read(self, offset: int, size: int, what: str) -> memoryview:
        """``size`` bytes at ``offset`` into the region; 400 if they are not all inside it
        (or no longer in the file)."""
        self._check(offset, size, what)
        buffer = memoryview(np.empty(size, np.uint8))
        done = 0
        while done < size:  # one preadv returns at most 2 GiB
            got = os.preadv(self.fd, [buffer[done:]], self.offset + offset + done)
            if got == 0:
                raise InvalidInput(f"{what}: the shared memory file shrank below the region")
            done += got
        return buffer

    def write(self, offset: int, data: np.ndarray, what: str) -> None:
        """``data``'s bytes at ``offset`` into the region; 400 if they do not fit it."""
        self._check(offset, data.nbytes, what)
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        while view:
            written = os.pwrite(self.fd, view, self.offset + offset)
            view, offset = view[written:], offset + written

    def handle(self) -> dict[str, Any]:
        """What a worker needs to open this file itself (our descriptor, by /proc)."""
        st = os.fstat(self.fd)
        return {"path": f"/proc/{os.getpid()}/fd/{self.fd}", "ino": st.st_ino,
                "dev": st.st_dev, "offset": self.offset, "byte_size": self.byte_size}  # fmt: skip

    def close(self) -> None:
        os.close(self.fd)


class RequestRegions:
    """The regions one request uses, each on a descriptor of the request's own, closed
    when the request ends (``close``, or ``with``).

    Never the registered descriptor itself: an unregister (from another connection) or a
    sweep closes that mid-request, the next file this process opens takes its number, and
    the request would read or write that file instead."""

    def __init__(self, open_file: Callable[[str], RegionFile]) -> None:
        self._open_file = open_file
        self._files: dict[str, RegionFile] = {}

    def __call__(self, name: str) -> RegionFile:
        file = self._files.get(name)
        if file is None:
            file = self._files[name] = self._open_file(name)
        return file

    def close(self) -> None:
        files, self._files = self._files, {}
        for file in files.values():
            file.close()

    def __enter__(self) -> RequestRegions:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class Region:
    """A registered region: the caller's file, held open, and what part of it is usable."""

    name: str
    key: str
    offset: int
    byte_size: int
    owner: Peer
    fd: int

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}  # fmt: skip

    def file(self) -> RegionFile:
        """The region on a descriptor of its own (``os.dup``), for one request."""
        return RegionFile(os.dup(self.fd), self.offset, self.byte_size)

    def close(self) -> None:
        os.close(self.fd)


def open_region(caller: Peer, name: Any, key: Any, offset: Any, byte_size: Any) -> Region:
    """The caller's region, its file open and checked; blocking (a file in the caller's
    filesystem): call it from a thread, then ``SharedMemory.add`` it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"region name {excerpt(str(name))} must be 1-255 visible ASCII")
    file = _checked_key(key)
    offset = _checked_size("offset", offset)
    byte_size = _checked_size("byte_size", byte_size)
    fd = _open_in(caller, file, key)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"shared memory key {excerpt(key)} is not a regular file")
        if caller.uid != 0 and st.st_uid != caller.uid:
            raise InvalidInput(f"shared memory key {excerpt(key)} is not the caller's")
        if offset + byte_size > st.st_size:
            raise InvalidInput(
                f"region {excerpt(name)}: {byte_size} bytes at offset {offset} go past "
                f"the end of {excerpt(key)} ({st.st_size} bytes)"
            )
    except BaseException:
        os.close(fd)
        raise
    return Region(name, key, offset, byte_size, caller, fd)


class SharedMemory:
    """Registered regions by (scope, name); regions of callers that are gone are dropped
    every ``SWEEP_SECONDS`` while any is registered (their /proc reads in a thread)."""

    def __init__(self) -> None:
        self._regions: dict[tuple[str, str], Region] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def add(self, region: Region) -> None:
        """Register an opened region (``open_region``); refused if its name is taken, or
        past the caller's or the node's limit."""
        scope = region.owner.scope
        taken = self._regions.get((scope, region.name))
        if taken is not None and not taken.owner.alive():  # one /proc read, not a sweep
            del self._regions[(scope, region.name)]
            taken.close()
        elif taken is not None:
            region.close()
            raise InvalidInput(f"shared memory region {excerpt(region.name)} is already registered")
        if sum(1 for s, _ in self._regions if s == scope) >= MAX_REGIONS:
            region.close()
            raise InvalidInput(f"at most {MAX_REGIONS} shared memory regions per caller")
        if len(self._regions) >= node_region_limit():
            region.close()
            raise InvalidInput(
                "the node holds as many shared memory regions as it may; try again later"
            )
        self._regions[(scope, region.name)] = region
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        regions = list(self._regions.items())
        gone = asyncio.get_running_loop().run_in_executor(None, _of_gone_callers, regions)
        gone.add_done_callback(self._drop)

    def _drop(self, gone: asyncio.Future[list[tuple[tuple[str, str], Region]]]) -> None:
        """Close the regions the sweep found gone (unless unregistered meanwhile)."""
        if gone.cancelled():
            return
        for key, region in gone.result():
            if self._regions.get(key) is region:
                del self._regions[key]
                region.close()
        if self._regions and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def unregister(self, caller: Peer, name: str | None) -> None:
        """Forget the caller's region (or all of them); unknown names are no error, as in
        Triton. Requests under way keep their own descriptors (``RequestRegions``)."""
        keys = [k for k in self._regions if k[0] == caller.scope and name in (None, k[1])]
        for key in keys:
            self._regions.pop(key).close()

    def status(self, caller: Peer, name: str | None) -> list[dict[str, Any]]:
        """The caller's regions (those of its processes gone go within ``SWEEP_SECONDS``)."""
        if name is not None:
            return [self.region(caller, name).status()]
        return [
            r.status() for (scope, _), r in sorted(self._regions.items()) if scope == caller.scope
        ]

    def lookup(self, caller: Peer) -> RequestRegions:
        """The caller's regions by name, for one request (which closes them)."""
        return RequestRegions(lambda name: self.region(caller, name).file())

    def region(self, caller: Peer, name: str) -> Region:
        region = self._regions.get((caller.scope, name))
        if region is None:
            raise InvalidInput(f"no shared memory region {excerpt(name)} is registered")
        return region


def _of_gone_callers(
    regions: list[tuple[tuple[str, str], Region]],
) -> list[tuple[tuple[str, str], Region]]:
    """Those of ``regions`` whose registering process is gone (one /proc read each)."""
    return [(key, region) for key, region in regions if not region.owner.alive()]


def node_region_limit() -> int:
    """How many regions the node holds at most: ``MAX_NODE_REGIONS``, and at most a
    quarter of our open-files limit, since each region holds a descriptor (the agent
    raises its soft limit to the hard one when it starts)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_NODE_REGIONS if soft == resource.RLIM_INFINITY else min(MAX_NODE_REGIONS, soft // 4)


TMPFS_MAGIC = 0x01021994
"""``statfs.f_type`` of tmpfs: a caller's /dev/shm and its keys must be shared memory."""
_FOLDER = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LIBC = ctypes.CDLL(None, use_errno=True)


def _filesystem_type(fd: int) -> int:
    """``fstatfs(fd).f_type`` (``os.statvfs`` does not give it); f_type is the first
    field of ``struct statfs``, a C long, on every Linux ABI."""
    buffer = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
    if _LIBC.fstatfs(fd, buffer) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return ctypes.c_long.from_buffer(buffer).value


def _open_in(caller: Peer, file: str, key: str) -> int:
    """The key, opened in the caller's /dev/shm one component at a time from its root.

    Never by path: the kernel resolves an absolute symlink at ``dev`` or ``shm`` against
    *our* root (the host's), so a caller that chroots into a folder whose ``dev/shm``
    links out would have us open host files as root. Each folder is opened with
    O_NOFOLLOW (a symlink is refused), and must be tmpfs (no NFS or FUSE to hang on)."""
    opened: list[int] = []
    try:
        opened.append(os.open(caller.root(), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        for folder in ("dev", "shm"):
            opened.append(os.open(folder, _FOLDER, dir_fd=opened[-1]))
        if _filesystem_type(opened[-1]) != TMPFS_MAGIC:
            raise InvalidInput("the caller's /dev/shm is not shared memory (tmpfs)")
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(file, flags, dir_fd=opened[-1])
    except FileNotFoundError:
        raise InvalidInput(f"shared memory key {excerpt(key)} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"shared memory key {excerpt(key)} cannot be opened: "
                           f"{exc.strerror}") from None  # fmt: skip
    finally:
        for folder_fd in opened:
            os.close(folder_fd)
    if _filesystem_type(fd) != TMPFS_MAGIC:  # a file mounted over a key
        os.close(fd)
        raise InvalidInput(f"shared memory key {excerpt(key)} is not shared memory (tmpfs)")
    return fd


class TensorBytes(Protocol):
    """Where a tensor's bytes are read from and written to (``RegionFile``, ``Region``)."""

    def read(self, offset: int, size: int, what: str) -> memoryview: ...

    def write(self, offset: int, data: np.ndarray, what: str) -> None: ...


Lookup = Callable[[str], TensorBytes]
"""A region's name -> its bytes (InvalidInput for a name the caller did not register)."""


def resolve_inputs(request: InferRequest, lookup: Lookup, max_elements: int) -> None:
    """Read the request's shared-memory inputs into arrays (blocking: large ones in a thread)."""
    for name, ref in request.shared.items():
        if name in request.inputs:
            raise InvalidInput(f"input {excerpt(name)} is given twice")
        _check_input_size(name, ref, max_elements)
        raw = lookup(ref.region).read(ref.offset, ref.byte_size, f"input {excerpt(name)}")
        spec = {"name": name, "datatype": ref.datatype, "shape": ref.shape}
        request.inputs[name] = decode_tensor(spec, raw, max_elements=max_elements)[1]
    request.shared = {}


def _check_input_size(name: str, ref: SharedRef, max_elements: int) -> None:
    """An input's byte_size against what its datatype and shape need, before a byte is
    allocated or read: a caller's sparse file costs it nothing, our memory a lot."""
    what = f"input {excerpt(name)}"
    dtype = DATATYPES.get(ref.datatype) if isinstance(ref.datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"{what}: unknown datatype {excerpt(str(ref.datatype))}")
    shape = ref.shape
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise InvalidInput(f"{what}: 'shape' must be a list of non-negative integers")
    count = prod(shape)
    if count > max_elements:
        raise InvalidInput(
            f"{what}: shape {excerpt(str(shape))} has {count} elements, over the limit of "
            f"{max_elements}"
        )
    if ref.datatype == "BYTES":  # each element behind a 4-byte length
        if not 4 * count <= ref.byte_size <= MAX_BYTES_INPUT:
            raise InvalidInput(
                f"{what}: {ref.byte_size} bytes for {count} BYTES elements (at least "
                f"{4 * count}, at most {MAX_BYTES_INPUT})"
            )
    elif ref.byte_size != count * dtype.itemsize:
        raise InvalidInput(
            f"{what}: shared_memory_byte_size is {ref.byte_size}, shape {excerpt(str(shape))} of "
            f"{ref.datatype} needs {count * dtype.itemsize}"
        )


def place_outputs(request: InferRequest, response: InferResponse, lookup: Lookup) -> None:
    """Write the outputs the request asked into shared memory there; the answer then only
    describes them (``response.placed``)."""
    for out in request.outputs or ():
        ref = out.shm
        array = response.outputs.get(out.name)
        if ref is None or array is None:
            continue
        what = f"output {excerpt(out.name)}"
        datatype = datatype_of(array)
        if datatype == "BYTES":
            _, raw = encode_tensor(out.name, array, binary=True)
            data = np.frombuffer(raw or b"", np.uint8)
        else:
            data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).reshape(-1)
        if data.nbytes > ref.byte_size:
            raise InvalidInput(
                f"{what} has {data.nbytes} bytes, more than the {ref.byte_size} given for it"
            )
        lookup(ref.region).write(ref.offset, data, what)
        del response.outputs[out.name]
        response.placed[out.name] = {
            "name": out.name,
            "datatype": datatype,
            "shape": list(array.shape),
            "region": ref.region,
            "byte_size": data.nbytes,
        }


class WorkerRegions:
    """In a worker: the regions the agent handed over with a request, each opened through
    the agent's descriptor for that request only (the agent holds it open until the
    request's answer; the inode is checked, so a number reused meanwhile is refused)."""

    def lookup(self, handles: dict[str, Any]) -> RequestRegions:
        def open_file(name: str) -> RegionFile:
            handle = handles.get(name)
            if not isinstance(handle, dict):
                raise InvalidInput(f"no shared memory region {excerpt(name)} is registered")
            return _open_handed(handle)

        return RequestRegions(open_file)


def _open_handed(handle: dict[str, Any]) -> RegionFile:
    path = str(handle["path"])
    if not re.fullmatch(rf"/proc/{os.getppid()}/fd/\d+", path):
        raise InvalidInput("a shared memory region must come from the agent")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        raise InvalidInput("the shared memory region is no longer registered") from None
    st = os.fstat(fd)
    if (st.st_ino, st.st_dev) != (handle["ino"], handle["dev"]):
        os.close(fd)
        raise InvalidInput("the shared memory region changed since it was registered")
    return RegionFile(fd, int(handle["offset"]), int(handle["byte_size"]))


def refs_of(doc: dict[str, Any]) -> set[str]:
    """The region names a REST infer body's JSON part mentions (inputs and outputs)."""
    names = set()
    tensors = [t for key in ("inputs", "outputs") if isinstance(t := doc.get(key), list)]
    for tensor in (item for listed in tensors for item in listed):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if isinstance(params, dict) and isinstance(params.get("shared_memory_region"), str):
            names.add(params["shared_memory_region"])
    return names
