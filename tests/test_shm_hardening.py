"""Shared memory against hostile callers, with real processes and real files: a caller's
/dev/shm reached only inside its own root, descriptors a request owns, sizes checked
before anything is read, and a node-wide cap on regions."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import Agent, declaration, free_port, wait_for

from nodecache.serve.errors import InvalidInput
from nodecache.serve.peers import Peer, _peer
from nodecache.serve.pool.dataplane import _regions_named
from nodecache.serve.protocol import InferRequest, SharedRef
from nodecache.serve.triton.shm import (
    SWEEP_SECONDS,
    RegionFile,
    RequestRegions,
    SharedMemory,
    open_region,
    resolve_inputs,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")


def _me() -> Peer:
    peer = _peer(os.getpid(), os.getuid())
    assert peer is not None
    return peer


@pytest.fixture
def key() -> Iterator[str]:
    """A 64-byte file of our /dev/shm, removed afterwards."""
    name = f"nc_hardening_{os.getpid()}"
    Path(f"/dev/shm/{name}").write_bytes(bytes(range(64)))
    yield name
    Path(f"/dev/shm/{name}").unlink(missing_ok=True)


def _chrooted(root: Path) -> subprocess.Popen[bytes]:
    """A caller that chroots into ``root`` (as a pod's root may with CAP_SYS_CHROOT)."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os,time; os.chroot({str(root)!r}); os.chdir('/'); "
         "print('in', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == b"in\n"
    return child


@needs_root
@pytest.mark.parametrize("link", ["shm", "dev"])
def test_a_dev_shm_that_links_out_of_the_callers_root_is_refused(tmp_path: Path, link: str) -> None:
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "secret").write_bytes(b"HOST-ONLY SECRET")
    (outside / "shm").symlink_to(outside)
    root = tmp_path / "root"
    if link == "dev":  # root/dev -> host, so dev/shm -> host/shm -> host
        root.mkdir()
        (root / "dev").symlink_to(outside)
    else:
        (root / "dev").mkdir(parents=True)
        (root / "dev" / "shm").symlink_to(outside)
    child = _chrooted(root)
    try:
        caller = _peer(child.pid, 0)
        assert caller is not None
        with pytest.raises(InvalidInput, match="cannot be opened"):
            open_region(caller, "r", "secret", 0, 16)
    finally:
        child.kill()
        child.wait()
    assert (outside / "secret").read_bytes() == b"HOST-ONLY SECRET"


@needs_root
def test_a_dev_shm_that_is_not_tmpfs_is_refused(tmp_path: Path) -> None:
    shm = tmp_path / "root" / "dev" / "shm"
    shm.mkdir(parents=True)
    (shm / "k").write_bytes(b"x" * 16)
    if os.statvfs(shm).f_fsid == os.statvfs("/dev/shm").f_fsid:
        pytest.skip("the test folder is on /dev/shm's filesystem")
    child = _chrooted(tmp_path / "root")
    try:
        caller = _peer(child.pid, 0)
        assert caller is not None
        with pytest.raises(InvalidInput, match="not shared memory"):
            open_region(caller, "r", "k", 0, 16)
    finally:
        child.kill()
        child.wait()


def test_a_key_in_the_callers_own_dev_shm_opens(key: str) -> None:
    region = open_region(_me(), "r", key, 8, 16)
    file = region.file()
    try:
        assert bytes(file.read(0, 4, "input")) == bytes([8, 9, 10, 11])
        file.write(0, np.frombuffer(b"ab", np.uint8), "output")
    finally:
        file.close()
        region.close()
    assert Path(f"/dev/shm/{key}").read_bytes()[8:10] == b"ab"


async def test_a_request_keeps_its_region_when_the_caller_unregisters_it(
    key: str, tmp_path: Path
) -> None:
    """The probe of S2: unregistering mid-request frees the agent's descriptor number and
    the next file opened takes it; the request still reads the caller's file."""
    me, memory = _me(), SharedMemory()
    memory.add(open_region(me, "mine", key, 0, 32))
    secret = tmp_path / "agent-secret"
    secret.write_bytes(b"AGENT TOKEN " + b"." * 20)
    with memory.lookup(me) as regions:
        region = regions("mine")  # an in-flight request holds it
        memory.unregister(me, "mine")  # the caller, from another connection
        fd = os.open(secret, os.O_RDWR)  # whatever the agent opens next
        try:
            assert bytes(region.read(0, 32, "input")) == bytes(range(32))
            region.write(0, np.frombuffer(b"out", np.uint8), "output")
        finally:
            os.close(fd)
    assert secret.read_bytes() == b"AGENT TOKEN " + b"." * 20
    assert Path(f"/dev/shm/{key}").read_bytes()[:3] == b"out"
    with pytest.raises(OSError):
        os.fstat(region.fd)  # the request's own descriptor went with it
    with memory.lookup(me) as later, pytest.raises(InvalidInput, match="no shared memory"):
        later("mine")


_WORKER = """
import json, sys
from nodecache.serve.errors import InvalidInput
from nodecache.serve.triton.shm import WorkerRegions
with WorkerRegions().lookup(json.loads(sys.argv[1])) as regions:
    try:
        print(bytes(regions("mine").read(0, 4, "input")).hex())
    except InvalidInput as exc:
        print(exc)
"""


def _worker_reads(handles: dict) -> str:
    """What a worker (our child: we are its agent) reads through the handles."""
    argv = [sys.executable, "-P", "-c", _WORKER, json.dumps(handles)]
    return subprocess.run(argv, capture_output=True, check=True, text=True).stdout.strip()


async def test_a_worker_never_reads_a_descriptor_number_the_agent_reused(
    key: str, tmp_path: Path
) -> None:
    me, memory = _me(), SharedMemory()
    memory.add(open_region(me, "mine", key, 0, 32))
    with memory.lookup(me) as regions:
        handles = {"mine": regions("mine").handle()}
        assert _worker_reads(handles) == "00010203"
    secret = tmp_path / "agent-secret"
    secret.write_bytes(b"AGENT TOKEN")
    fd = os.open(secret, os.O_RDONLY)  # the request ended: its number is free again
    try:
        assert handles["mine"]["path"].endswith(f"/fd/{fd}")
        assert _worker_reads(handles) == "the shared memory region changed since it was registered"
    finally:
        os.close(fd)
    memory.unregister(me, None)


def _unread(name: str) -> RegionFile:
    pytest.fail(f"region {name} was read before the input's size was checked")


@pytest.mark.parametrize(
    ("datatype", "shape", "byte_size", "error"),
    [
        ("FP32", [1], 1 << 30, "needs 4"),  # the probe: a 1 GiB sparse file for one float
        ("FP32", [2], 4, "needs 8"),
        ("FP32", [1 << 20, 1 << 20], 1 << 42, "over the limit"),
        ("BYTES", [1], (1 << 26) + 1, "at most"),
        ("BYTES", [4], 8, "at least 16"),
        ("FP99", [1], 4, "unknown datatype"),
        ("FP32", [-1], 4, "non-negative"),
    ],
)
def test_an_input_whose_size_does_not_fit_its_shape_is_refused_before_reading(
    datatype: str, shape: list[int], byte_size: int, error: str
) -> None:
    request = InferRequest(inputs={})
    request.shared = {"x": SharedRef("big", byte_size, 0, datatype, shape)}
    with pytest.raises(InvalidInput, match=error):
        resolve_inputs(request, _unread, max_elements=1 << 24)


def test_an_input_of_the_size_its_shape_needs_is_read(key: str) -> None:
    request = InferRequest(inputs={})
    request.shared = {"x": SharedRef("r", 8, 4, "UINT16", [2, 2])}
    region = open_region(_me(), "r", key, 0, 64)
    with RequestRegions(lambda _: region.file()) as regions:
        resolve_inputs(request, regions, max_elements=16)
    region.close()
    expected = np.frombuffer(bytes(range(4, 12)), np.uint16).reshape(2, 2)
    assert np.array_equal(request.inputs["x"], expected)


def test_a_region_over_2_gib_is_read_whole() -> None:
    """One preadv stops at 2 GiB; a legal input past that must not read as "shrank"."""
    size, name = (2 << 30) + 4096, f"nc_huge_{os.getpid()}"
    path = Path(f"/dev/shm/{name}")
    with path.open("wb") as f:  # sparse: only the last page is stored
        f.seek(size - 4)
        f.write(b"tail")
    try:
        region = open_region(_me(), "huge", name, 0, size)
        with RequestRegions(lambda _: region.file()) as regions:
            data = regions("huge").read(0, size, "input")
            assert len(data) == size and bytes(data[-4:]) == b"tail"
            del data
        region.close()
    finally:
        path.unlink()


_NODE_CAP = """
import asyncio, os, resource, sys
from nodecache.serve.errors import InvalidInput
from nodecache.serve.peers import _peer
from nodecache.serve.triton.shm import SharedMemory, node_region_limit, open_region
resource.setrlimit(resource.RLIMIT_NOFILE, (80, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    me, memory = _peer(os.getpid(), os.getuid()), SharedMemory()
    print(node_region_limit())
    for n in range(node_region_limit() + 1):
        try:
            memory.add(open_region(me, f"r{n}", sys.argv[1], 0, 8))
        except InvalidInput as exc:
            print(n, exc)
    print(len(os.listdir("/proc/self/fd")) < 80)
asyncio.run(main())
"""


def test_regions_stop_at_a_quarter_of_the_open_files_limit(key: str) -> None:
    argv = [sys.executable, "-P", "-c", _NODE_CAP, key]
    out = subprocess.run(argv, capture_output=True, check=True, text=True).stdout.splitlines()
    assert out == [
        "20",
        "20 the node holds as many shared memory regions as it may; try again later",
        "True",
    ]


async def test_a_gone_callers_region_is_swept_and_its_name_free_again(key: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        caller = _peer(child.pid, os.getuid())
        assert caller is not None
        memory = SharedMemory()
        memory.add(open_region(caller, "r", key, 0, 8))
        with pytest.raises(InvalidInput, match="already registered"):
            memory.add(open_region(caller, "r", key, 0, 8))
    finally:
        child.kill()
        child.wait()
    await asyncio.sleep(SWEEP_SECONDS + 1)  # the sweep reads /proc in a thread
    assert memory.status(caller, None) == []
    memory.add(open_region(_me(), "r", key, 0, 8))  # the same name, another process
    assert [r["name"] for r in memory.status(_me(), None)] == ["r"]
    memory.unregister(_me(), None)


def test_the_agent_raises_its_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip("the hard open-files limit is already low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the agent inherits it
    try:
        agent = Agent(tmp_path).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert agent.proc is not None
        limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        agent.stop()


async def test_a_relayed_bodys_json_is_parsed_off_the_event_loop() -> None:
    """Worker mode reads the region names of any /infer body (no registration needed):
    a large JSON part must not hold the loop while it is parsed."""
    tensor = {"name": "x", "parameters": {"shared_memory_region": "r"}, "data": [0] * 1000}
    body = json.dumps({"inputs": [tensor] * 4000}).encode()  # ~12 MiB
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = ticks
    named = await _regions_named(body, None)
    ticker.cancel()
    assert named == {"r"}
    assert ticks - before > 50, "the loop stood still while the JSON was parsed"
    with pytest.raises(InvalidInput, match="not valid JSON"):
        await _regions_named(body[:-1], None)


_VERSIONED = """
import numpy as np
from nodecache.serve import Model
from nodecache.serve.runtimes import TensorSpec


class Doubled(Model):
    inputs = [TensorSpec("x", "FP32", (-1,))]
    outputs = [TensorSpec("y", "FP32", (-1,))]

    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    line = next((x for x in text.splitlines() if x.startswith(f"{name}{{{wanted}}} ")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


@pytest.mark.parametrize("workers", [0, 2])
def test_requests_in_shared_memory_are_never_mirrored(
    agent: Agent, tmp_path: Path, key: str, workers: int
) -> None:
    port = free_port()
    agent.start("--workers", str(workers), "--metrics-port", str(port),
                "--metrics-host", "127.0.0.1")  # fmt: skip
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.py").write_text(_VERSIONED)
    for name, number, traffic, mirror in (("primary", "1", 100, 0), ("shadow", "2", 0, 100)):
        serving = {"name": "m", "version": number, "traffic": traffic, "mirror": mirror}
        agent.declare(f"{name}.yaml", declaration(
            name, (tmp_path / "model").as_uri(), size="1Mi", runtime="python",
            entrypoint="model:Doubled", serving=serving,
        ))  # fmt: skip
    for name in ("primary", "shadow"):
        agent.wait_state(name, "Warm")
    Path(f"/dev/shm/{key}").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    code, doc = agent.request("POST", "/v2/systemsharedmemory/region/r/register",
                              {"key": key, "offset": 0, "byte_size": 64})  # fmt: skip
    assert code == 200, doc
    shared = {"shared_memory_region": "r", "shared_memory_byte_size": 32}
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [8], "parameters": shared}],
        "outputs": [{"name": "y", "parameters": {**shared, "shared_memory_offset": 32}}],
    }
    for _ in range(20):
        code, doc = agent.request("POST", "/v2/models/m/infer", body)
        assert code == 200, doc
    got = np.frombuffer(Path(f"/dev/shm/{key}").read_bytes()[32:], np.float32)
    assert np.array_equal(got, np.arange(8, dtype=np.float32) * 2)
    plain = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    assert agent.request("POST", "/v2/models/m/infer", plain)[0] == 200

    def copies() -> float:
        labels = {"model": "shadow", "version": "2"}
        return _metric(port, "nodecache_mirror_requests_total", **labels) + _metric(
            port, "nodecache_mirror_dropped_total", **labels
        )

    wait_for(lambda: copies() >= 1, what="the plain request's copy")
    assert copies() == 1  # that one only
