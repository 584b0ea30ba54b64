"""KServe modelcar images from a real registry (Debian's docker-registry 2.8): images built
here from tar layers, pushed over the registry API, fetched, and only ``/models`` kept.

Hostile layers are refused naming the entry, with nothing published; the unpacker itself is
also driven by Hypothesis with arbitrary entry names and kinds."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oci_registry import (  # noqa: F401 - the fixture
    DOCKER_TAR_GZIP,
    OCI_TAR,
    OCI_TAR_GZIP,
    Registry,
    registry_fixture,
)
from support import SMALL, Agent, declaration
from test_source_resume import CHILD, COMPLETE_BEFORE_KILL, OPTIONS, bytes_read  # noqa: F401

from nodecache.cache import MANIFEST_NAME, FetchError, FetchOptions, IntegrityError, ModelStore
from nodecache.cache.budget import WriteBudget
from nodecache.cache.errors import SizeLimitError
from nodecache.cache.sources import modelcar
from nodecache.cache.sources.modelcar import LAYERS_DIR, Layer, unpack_layers
from nodecache.cache.verify import verify_model


def layer(entries: list[tuple[str, bytes, bytes | str]], *, gzipped: bool = True) -> bytes:
    """A layer as an image builder writes it: a tar (gzip-compressed unless told) of
    (name, tarfile type, the file's bytes or the link's target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                assert isinstance(data, str)
                info.linkname = data
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    raw = out.getvalue()
    return gzip.compress(raw, mtime=0) if gzipped else raw


def reg(name: str, data: bytes) -> tuple[str, bytes, bytes]:
    return name, tarfile.REGTYPE, data


def folder(name: str) -> tuple[str, bytes, bytes]:
    return name, tarfile.DIRTYPE, b""


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[str, bytes, str]:
    return name, kind, target


BASE = layer(
    [
        folder("etc"),
        reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        folder("usr/bin"),
        reg("usr/bin/python3", b"\x7fELF not really"),
        reg("models-not-this/x", b"outside"),
    ]
)


def model_layers(onnx: bytes) -> list[tuple[bytes, str]]:
    """A base with junk outside /models, the model, then a layer that edits it."""
    models = layer(
        [
            folder("models"),
            reg("models/model.onnx", onnx),
            reg("models/old.bin", b"removed by a later layer"),
            reg("models/sub/a.txt", b"kept through its hard link only"),
            reg("models/sub/b.txt", b"hidden by the opaque folder"),
            reg("models/config.json", b'{"v": 1}'),
            link("models/same-as-model.bin", "model.onnx"),
            link("models/copy.txt", "models/sub/a.txt", tarfile.LNKTYPE),
        ]
    )
    edits = layer(
        [
            reg("models/.wh.old.bin", b""),
            reg("models/sub/.wh..wh..opq", b""),
            reg("models/sub/c.txt", b"new in the opaque folder"),
            reg("models/config.json", b'{"v": 2}'),
            reg("etc/.wh.passwd", b""),
        ],
        gzipped=False,
    )
    return [(BASE, OCI_TAR_GZIP), (models, OCI_TAR_GZIP), (edits, OCI_TAR)]


def expected_files(onnx: bytes) -> dict[str, bytes]:
    return {
        "model.onnx": onnx,
        "same-as-model.bin": onnx,
        "sub/c.txt": b"new in the opaque folder",
        "copy.txt": b"kept through its hard link only",
        "config.json": b'{"v": 2}',
    }


def read_model(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in path.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _repo(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


@pytest.fixture(scope="module")
def onnx(mlp_dir: Path) -> bytes:
    return (mlp_dir / "model.onnx").read_bytes()


async def test_a_modelcar_keeps_only_models_with_layers_applied_in_order(
    tmp_path: Path, oci_registry: Registry, onnx: bytes
) -> None:
    repo = _repo("modelcar")
    digest = oci_registry.push_image(f"{repo}:v1", model_layers(onnx))
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert read_model(model.path) == expected_files(onnx)
    assert model.resolved == digest
    assert {f.path: f.sha256 for f in model.files} == {
        p: hashlib.sha256(d).hexdigest() for p, d in expected_files(onnx).items()
    }
    on_disk = {p.name for p in model.path.iterdir()}
    assert LAYERS_DIR not in on_disk and "etc" not in on_disk  # scratch blobs gone, no junk
    manifest = json.loads((model.path / MANIFEST_NAME).read_text())
    assert manifest["resolved"] == digest
    assert not list((tmp_path / "cache" / "tmp").iterdir())


async def test_nodecache_verify_rechecks_an_unpacked_modelcar(
    tmp_path: Path, oci_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelcar, "LOCAL_CHUNK", 64 * 1024)  # several chunks per file
    weights = os.urandom(200_000)
    repo = _repo("verify")
    models = layer([reg("models/w.bin", weights), link("models/same.bin", "w.bin")])
    oci_registry.push_image(f"{repo}:v1", [(models, OCI_TAR_GZIP)])
    model = await ModelStore(tmp_path / "cache", options=SMALL).fetch(
        f"oci://{oci_registry.host}/{repo}:v1"
    )
    with ThreadPoolExecutor(2) as pool:
        assert verify_model(model, pool).ok

        with open(model.path / "w.bin", "r+b") as f:  # one flipped byte, in the third chunk
            f.seek(150_000)
            f.write(bytes([weights[150_000] ^ 1]))
        verdict = verify_model(model, pool)

    assert set(verdict.corrupt) == {(p, 131072, 196608) for p in ("same.bin", "w.bin")}


async def test_a_docker_schema2_image_by_digest(
    tmp_path: Path, oci_registry: Registry, onnx: bytes
) -> None:
    repo = _repo("docker")
    models = layer([folder("models"), reg("models/model.onnx", onnx)])
    digest = oci_registry.push_image(
        f"{repo}:v1", [(BASE, DOCKER_TAR_GZIP), (models, DOCKER_TAR_GZIP)], docker=True
    )
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}@{digest}")

    assert read_model(model.path) == {"model.onnx": onnx}


async def test_an_image_index_gives_this_machines_modelcar(
    tmp_path: Path, oci_registry: Registry, onnx: bytes
) -> None:
    repo = _repo("index")
    here = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    other = "s390x"
    oci_registry.push_image(
        f"{repo}:{here}", [(layer([reg("models/model.onnx", onnx)]), OCI_TAR_GZIP)]
    )
    oci_registry.push_image(f"{repo}:{other}", [(layer([reg("models/other", b"x")]), OCI_TAR_GZIP)])
    index = oci_registry.push_index(f"{repo}:v1", {other: other, here: here})
    oci_registry.push_index(f"{repo}:elsewhere", {other: other})
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")
    assert read_model(model.path) == {"model.onnx": onnx}
    assert model.resolved == index  # the index's digest: what the tag named
    with pytest.raises(FetchError, match=f"no linux/{here} manifest") as info:
        await store.fetch(f"oci://{oci_registry.host}/{repo}:elsewhere")
    assert info.value.permanent


@pytest.mark.parametrize(
    ("media", "said"),
    [
        ("application/vnd.oci.image.layer.v1.tar+zstd", "push it with gzip layers"),
        ("application/vnd.example.unknown", "neither a file with a title annotation"),
    ],
)
async def test_zstd_and_unknown_layer_types_are_refused_before_any_download(
    tmp_path: Path, oci_registry: Registry, media: str, said: str
) -> None:
    repo = _repo("zstd")
    oci_registry.push_image(f"{repo}:v1", [(BASE, OCI_TAR_GZIP), (b"\x28\xb5\x2f\xfd", media)])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError, match=said) as info:
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert info.value.permanent and media in str(info.value)
    assert store.stats.bytes_fetched == 0
    assert not list((tmp_path / "cache" / "models").iterdir())


HOSTILE = {
    "absolute": ([reg("/models/x", b"x")], "'/models/x' is an absolute path"),
    "dot-dot": ([reg("models/../etc/cron", b"x")], "'models/../etc/cron' climbs out"),
    "dot-dot-outside": ([reg("../x", b"x")], "'../x' climbs out"),
    "char-device": ([("models/null", tarfile.CHRTYPE, b"")], "'models/null' is a device"),
    "block-device": ([("models/sda", tarfile.BLKTYPE, b"")], "'models/sda' is a device"),
    "fifo": ([("models/pipe", tarfile.FIFOTYPE, b"")], "'models/pipe' is a device or fifo"),
    "symlink-absolute": (
        [link("models/passwd", "/etc/passwd")],
        "'models/passwd' is a link to '/etc/passwd', outside /models",
    ),
    "symlink-climbing": (
        [link("models/sub/up", "../../etc")],
        "'models/sub/up' is a link to '../../etc', outside",
    ),
    "symlink-to-models-itself": ([link("models/me", ".")], "'models/me' is a link to '.'"),
    "hardlink-outside": (
        [reg("etc/shadow", b"secret"), link("models/shadow", "etc/shadow", tarfile.LNKTYPE)],
        "'models/shadow' is a link to 'etc/shadow', outside /models",
    ),
    "reserved-name": ([reg("models/.nodecache-manifest.json", b"{}")], "refusing object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_layers_are_refused_naming_the_entry_and_nothing_is_published(
    tmp_path: Path, oci_registry: Registry, onnx: bytes, case: str
) -> None:
    entries, said = HOSTILE[case]
    repo = _repo("hostile")
    good = layer([reg("models/model.onnx", onnx)])
    oci_registry.push_image(f"{repo}:v1", [(good, OCI_TAR_GZIP), (layer(entries), OCI_TAR_GZIP)])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert said in str(info.value)
    assert info.value.permanent
    assert not list((tmp_path / "cache" / "models").iterdir())
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # no partial left to serve
    assert not (tmp_path / "etc").exists()


async def test_a_corrupted_layer_is_never_unpacked(
    tmp_path: Path, oci_registry: Registry, onnx: bytes
) -> None:
    repo = _repo("corrupt")
    models = layer([reg("models/model.onnx", onnx)], gzipped=False)
    oci_registry.push_image(f"{repo}:v1", [(models, OCI_TAR)])
    digest = "sha256:" + hashlib.sha256(models).hexdigest()
    # Same length, other bytes: a valid layer that would unpack a different model.
    evil = layer([reg("models/model.onnx", onnx[:-1] + b"!")], gzipped=False)
    oci_registry.blob_file(digest).write_bytes(evil)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match="sha256"):
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert not list((tmp_path / "cache" / "models").iterdir())
    assert not list((tmp_path / "cache").rglob("model.onnx"))


async def test_a_gzip_bomb_stops_at_the_declared_size(
    tmp_path: Path, oci_registry: Registry
) -> None:
    repo = _repo("bomb")
    bomb = layer([reg("models/zeros.bin", bytes(8 << 20))])
    assert len(bomb) < 64 * 1024
    oci_registry.push_image(f"{repo}:v1", [(bomb, OCI_TAR_GZIP)])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(SizeLimitError, match="modelSize"):
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1", max_bytes=1 << 20)

    assert not list((tmp_path / "cache" / "models").iterdir())
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def zeros_gzip(head: bytes, zeros: int, tail: bytes) -> bytes:
    """One gzip stream of ``head``, ``zeros`` MiB of zeros and ``tail``, built from one
    compressed MiB repeated (each block starts afresh after a full flush): a blob of
    about 1 KiB per MiB it expands to, valid to its trailer."""

    def deflated(data: bytes, end: int) -> bytes:
        pack = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return pack.compress(data) + pack.flush(end)

    mib = bytes(1 << 20)
    crc = zlib.crc32(head)
    for _ in range(zeros):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + (zeros << 20) + len(tail)
    body = (
        deflated(head, zlib.Z_FULL_FLUSH)
        + deflated(mib, zlib.Z_FULL_FLUSH) * zeros
        + deflated(tail, zlib.Z_FINISH)
    )
    trailer = crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + trailer


def header(kind: bytes, size: int, name: str = "././@LongHeader") -> bytes:
    """One tar header block announcing ``size`` bytes of ``kind``."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def pax_record(size: int) -> bytes:
    """A pax ``comment`` record of exactly ``size`` bytes (its length counts itself)."""
    filler = size - len(str(size)) - len(" comment=\n")
    record = b"%d comment=%s\n" % (size, b"x" * filler)
    assert len(record) == size
    return record


def extended(kind: bytes, data: bytes, name: str = "././@LongHeader") -> bytes:
    """One tar entry (header and padded data), as it sits inside an archive."""
    return header(kind, len(data), name) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


GIB_PAX = 1 << 10
"""MiB the pax header of the probe announces (the layer blob is about 1 MiB)."""
MODEL = extended(tarfile.REGTYPE, b"the model", "models/model.onnx") + bytes(2 * tarfile.BLOCKSIZE)
"""The model's entry and the archive's end, to append after hostile headers."""
UNSAFE = {
    "pax-header-of-1-gib": (
        lambda: zeros_gzip(header(tarfile.XHDTYPE, GIB_PAX << 20), GIB_PAX, MODEL),
        "has an extended tar header of 1.0 GiB",
    ),
    "global-pax-headers-past-1-mib": (
        lambda: gzip.compress(
            extended(tarfile.XGLTYPE, pax_record(600 << 10))
            + extended(tarfile.REGTYPE, b"base", "base/a")
            + extended(tarfile.XGLTYPE, pax_record(600 << 10))
            + MODEL
        ),
        "global pax headers past 1.0 MiB",
    ),
    "gnu-long-name-of-2-mib": (
        lambda: gzip.compress(extended(tarfile.GNUTYPE_LONGNAME, b"n" * (2 << 20)) + MODEL),
        "has an extended tar header of 2.0 MiB",
    ),
    "chain-of-headers-past-1-mib": (
        lambda: gzip.compress(
            extended(tarfile.GNUTYPE_LONGLINK, b"l" * (600 << 10))
            + extended(tarfile.XHDTYPE, pax_record(600 << 10))
            + MODEL
        ),
        "taking the headers of one entry past 1.0 MiB",
    ),
    "many-small-headers-in-a-row": (
        lambda: gzip.compress(extended(tarfile.XHDTYPE, pax_record(64)) * 200 + MODEL),
        "more than 8 extended headers in a row",
    ),
    "gnu-sparse-entry": (
        lambda: gzip.compress(header(tarfile.GNUTYPE_SPARSE, 0, "models/sparse") + MODEL),
        "has a GNU sparse entry",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
async def test_extended_headers_are_refused_before_they_are_read(
    tmp_path: Path, oci_registry: Registry, case: str
) -> None:
    """tarfile reads pax and GNU long-name headers whole into memory: a 1 MiB layer whose
    header announces 1 GiB is refused from that header, before its bytes are read."""
    make, said = UNSAFE[case]
    blob = make()
    assert len(blob) < 4 << 20
    repo = _repo("unsafe")
    oci_registry.push_image(f"{repo}:v1", [(blob, OCI_TAR_GZIP)])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert said in str(info.value)
    assert "nothing was published" in str(info.value)
    assert info.value.permanent
    assert not list((tmp_path / "cache" / "models").iterdir())
    assert not list((tmp_path / "cache" / "tmp").iterdir())


UNPACK_IN_CHILD = """
import sys, threading
from pathlib import Path
from nodecache.cache.budget import WriteBudget
from nodecache.cache.errors import SizeLimitError
from nodecache.cache.sources.modelcar import Layer, unpack_layers
model = Path(sys.argv[1])
blob = Layer(model / sys.argv[2], sys.argv[3], "sha256:" + "0" * 64)
budget = WriteBudget(1 << 20, lambda: SizeLimitError("too big"))
files = unpack_layers(model, [blob], uri="oci://x/y:z", file_mode=0o640, budget=budget,
                      abort=threading.Event())
print(*(f.path for f in files))
"""


def test_a_pax_header_of_digits_is_parsed_in_one_pass(tmp_path: Path) -> None:
    """Before Python 3.11.10 tarfile parses a pax header with regular expressions quadratic
    in its digits (CVE-2024-6232): a comment of 1000 KiB of them, within the 1 MiB allowed,
    would cost the agent half an hour of CPU. A child held to 60 CPU seconds unpacks it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("models/model.onnx")
        info.size, info.pax_headers = 9, {"comment": "1" * (1000 << 10)}
        tar.addfile(info, io.BytesIO(b"the model"))
    model = tmp_path / "model"
    (model / LAYERS_DIR).mkdir(parents=True)
    (model / LAYERS_DIR / "0").write_bytes(out.getvalue())

    def at_most_a_minute_of_cpu() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))

    child = subprocess.run(
        [sys.executable, "-c", UNPACK_IN_CHILD, str(model), f"{LAYERS_DIR}/0", OCI_TAR],
        capture_output=True,
        preexec_fn=at_most_a_minute_of_cpu,
    )
    assert child.returncode == 0, (child.returncode, child.stderr.decode()[-2000:])
    assert child.stdout.split() == [b"model.onnx"]
    assert (model / "model.onnx").read_bytes() == b"the model"


async def test_layers_that_expand_without_end_stop_at_the_bound(
    tmp_path: Path, oci_registry: Registry
) -> None:
    """Entries outside /models are never written, but decompressing them costs CPU: every
    byte counts, and 2 GiB of base for a 4 MiB model stops past 2 x 5 MiB + 1 GiB."""
    junk = header(tarfile.REGTYPE, 2 << 30, "usr/lib/huge.so")
    blob = zeros_gzip(junk, 2 << 10, MODEL)
    assert len(blob) < 4 << 20
    repo = _repo("expand")
    oci_registry.push_image(f"{repo}:v1", [(BASE, OCI_TAR_GZIP), (blob, OCI_TAR_GZIP)])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1", max_bytes=4 << 20)

    assert "expands the layers past 1.0 GiB" in str(info.value)
    assert "twice the model's write allowance of 5.0 MiB" in str(info.value)
    assert info.value.permanent
    assert not list((tmp_path / "cache" / "models").iterdir())
    assert not list((tmp_path / "cache" / "tmp").iterdir())


@pytest.mark.parametrize(
    ("layers", "said"),
    [
        ([(b"not a tar at all, though its digest is right", OCI_TAR_GZIP)], "not a valid"),
        ([(BASE, OCI_TAR_GZIP)], "no files under /models"),
        ([(extended(tarfile.XHDTYPE, b"99 path=a\n") + MODEL, OCI_TAR)], "invalid pax header"),
    ],
)
async def test_broken_and_empty_images_are_clear_errors(
    tmp_path: Path, oci_registry: Registry, layers: list[tuple[bytes, str]], said: str
) -> None:
    repo = _repo("broken")
    oci_registry.push_image(f"{repo}:v1", layers)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError, match=said) as info:
        await store.fetch(f"oci://{oci_registry.host}/{repo}:v1")

    assert info.value.permanent
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_an_agent_serves_a_modelcar(oci_registry: Registry, agent: Agent, onnx: bytes) -> None:
    repo = _repo("served")
    oci_registry.push_image(f"{repo}:v1", model_layers(onnx))
    agent.start()
    agent.declare("car.yaml", declaration("car", f"oci://{oci_registry.host}/{repo}:v1"))
    assert agent.wait_state("car", "Warm")["resolved"].startswith("sha256:")

    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    code, answer = agent.request("POST", "/v2/models/car/infer", body)
    assert code == 200, answer
    session = ort.InferenceSession(onnx)
    expected = session.run(None, {"input": x})[0]
    got = np.array(answer["outputs"][0]["data"], np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# -- the unpacker on arbitrary layers ------------------------------------------------------

_SEGMENT = st.sampled_from(
    ["models", "models", "..", ".", "", "a", "b", ".wh.a", ".wh..wh..opq", "etc", "/"]
)
_NAME = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join)
_KIND = st.sampled_from(
    [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
     tarfile.FIFOTYPE, tarfile.CHRTYPE]
)  # fmt: skip
_TARGET = st.one_of(_NAME, st.sampled_from(["/etc/passwd", "../..", "a", "/models/a"]))
_ENTRY = st.tuples(_NAME, _KIND, _TARGET)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layers=st.lists(st.lists(_ENTRY, max_size=6), min_size=1, max_size=3),
    within=st.sampled_from(["models", ""]),  # a modelcar's /models, a ModelPack's archives
)
def test_no_layer_writes_outside_the_folder_or_leaves_a_link(
    tmp_path_factory: pytest.TempPathFactory,
    layers: list[list[tuple[str, bytes, str]]],
    within: str,
) -> None:
    root = tmp_path_factory.mktemp("unpack")
    model = root / "model"
    (model / LAYERS_DIR).mkdir(parents=True)
    blobs = []
    for i, entries in enumerate(layers):
        blob = model / LAYERS_DIR / f"{i}"
        as_tar = [
            (name, kind, target if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else b"data")
            for name, kind, target in entries
        ]
        blob.write_bytes(layer(as_tar, gzipped=False))
        blobs.append(Layer(blob, OCI_TAR, f"sha256:{i:064d}"))
    budget = WriteBudget(1 << 20, lambda: SizeLimitError("too big"))
    try:
        files = unpack_layers(
            model, blobs, uri="oci://x/y:z", file_mode=0o640, budget=budget,
            abort=threading.Event(), within=within,
        )  # fmt: skip
    except FetchError as exc:
        assert exc.permanent
        files = []
    everything = list(root.rglob("*"))
    assert all(p == model or model in p.parents for p in everything)
    assert not any(p.is_symlink() for p in everything)
    assert all(p.is_dir() or p.is_file() for p in everything)  # no fifo or device
    for f in files:
        data = (model / f.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256)


def _unpack(tmp_path: Path, layers: list[bytes]) -> dict[str, bytes]:
    """``layers`` (plain tars) applied by the unpacker alone; the model's files."""
    model = tmp_path / "model"
    (model / LAYERS_DIR).mkdir(parents=True)
    blobs = []
    for i, data in enumerate(layers):
        (model / LAYERS_DIR / str(i)).write_bytes(data)
        blobs.append(Layer(model / LAYERS_DIR / str(i), OCI_TAR, f"sha256:{i:064d}"))
    budget = WriteBudget(1 << 20, lambda: SizeLimitError("too big"))
    unpack_layers(
        model, blobs, uri="oci://x/y:z", file_mode=0o640, budget=budget, abort=threading.Event()
    )
    assert not (model / LAYERS_DIR).exists()
    return read_model(model)


def test_an_opaque_marker_keeps_what_its_own_layer_wrote(tmp_path: Path) -> None:
    lower = layer([reg("models/old/a", b"lower"), reg("models/top", b"lower")], gzipped=False)
    upper = layer(
        [
            reg("models/new/b", b"upper"),  # no folder entry before it, as some builders write
            reg("models/old/c", b"upper"),
            reg("models/.wh..wh..opq", b""),
        ],
        gzipped=False,
    )

    assert _unpack(tmp_path, [lower, upper]) == {"new/b": b"upper", "old/c": b"upper"}


def test_a_later_layer_replaces_files_folders_and_links(tmp_path: Path) -> None:
    lower = layer(
        [reg("models/x", b"file"), reg("models/d/in", b"in"), link("models/l", "x")],
        gzipped=False,
    )
    upper = layer(
        [reg("models/x/now-a-folder", b"1"), reg("models/d", b"now a file"), reg("models/l", b"2")],
        gzipped=False,
    )

    assert _unpack(tmp_path, [lower, upper]) == {
        "x/now-a-folder": b"1",
        "d": b"now a file",
        "l": b"2",
    }


def test_a_killed_modelcar_fetch_resumes_its_layers(
    tmp_path: Path,
    oci_registry: Registry,
    bytes_read: list[int],  # noqa: F811 - the fixture
) -> None:
    weights = os.urandom(1 << 20)  # random: the gzip layer is as large, many parts
    repo = _repo("resume")
    layers = [(BASE, OCI_TAR_GZIP), (layer([reg("models/weights.bin", weights)]), OCI_TAR_GZIP)]
    oci_registry.push_image(f"{repo}:v1", layers)
    uri = f"oci://{oci_registry.host}/{repo}:v1"
    root = tmp_path / "cache"
    script = CHILD.format(complete=COMPLETE_BEFORE_KILL, options=OPTIONS)
    child = subprocess.run(
        [sys.executable, "-c", script, str(root), uri], capture_output=True, timeout=120
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]

    store = ModelStore(root, options=FetchOptions(**OPTIONS))
    store.scan()
    assert store.lookup(uri) is None
    model = asyncio.run(store.fetch(uri))

    assert read_model(model.path) == {"weights.bin": weights}
    assert sum(bytes_read) < sum(len(data) for data, _ in layers)  # kept parts not read again
