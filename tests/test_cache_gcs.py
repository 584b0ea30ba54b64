"""The model store against a GCS emulator (fake-gcs-server) on loopback."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest
from awscrt.checksums import crc32c
from object_stores import GCS_BUCKET as BUCKET
from object_stores import GcsServer
from support import SMALL

from nodecache.cache import MANIFEST_NAME, FetchError, IntegrityError, ModelStore


def read_model(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


async def test_fetch_gcs_folder_byte_for_byte(tmp_path: Path, gcs) -> None:
    files = {
        "config.json": b'{"a": 1}',
        "weights/w-0.bin": os.urandom(600_001),
        "weights/w-1.bin": os.urandom(1000),
    }
    for rel, data in files.items():
        gcs.pipe_file(f"{BUCKET}/folder/{rel}", data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"gs://{BUCKET}/folder/")

    assert read_model(model.path) == files
    for f in model.files:  # the emulator publishes each object's crc32c: verified by it
        assert f.checksum == f"crc32c:{crc32c(files[f.path]):08x}"


async def test_fetch_gcs_single_object(tmp_path: Path, gcs) -> None:
    data = os.urandom(300_000)
    gcs.pipe_file(f"{BUCKET}/single/model.onnx", data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"gs://{BUCKET}/single/model.onnx")

    assert (model.path / "model.onnx").read_bytes() == data


async def test_missing_gcs_object_is_permanent(tmp_path: Path, gcs) -> None:
    store = ModelStore(tmp_path / "cache", options=SMALL)
    with pytest.raises(FetchError) as info:
        await store.fetch(f"gs://{BUCKET}/nope/model.onnx")
    assert info.value.permanent


async def test_checksum_the_source_publishes_is_checked(
    tmp_path: Path,
    gcs,
    gcs_server: GcsServer,
) -> None:
    data = os.urandom(50_000)
    gcs.pipe_file(f"{BUCKET}/md5/model.onnx", data)
    info = gcs.info(f"{BUCKET}/md5/model.onnx")
    assert base64.b64decode(info["md5Hash"]) == hashlib.md5(data).digest()
    # Replace the bytes behind the emulator's back, keeping size and metadata.
    stored = [p for p in gcs_server.root.rglob("*") if p.is_file() and p.read_bytes() == data]
    if not stored:
        pytest.skip("emulator stores objects in an unexpected layout")
    stored[0].write_bytes(bytes([data[0] ^ 1]) + data[1:])
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match="crc32c "):  # preferred to the md5Hash
        await store.fetch(f"gs://{BUCKET}/md5/model.onnx")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
