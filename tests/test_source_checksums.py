"""Files verified by the CRC their object store publishes (S3 additional checksums on
SeaweedFS, GCS crc32c on fake-gcs-server) instead of a sha256 of every byte."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from object_stores import ACCESS_KEY, GCS_BUCKET, SECRET_KEY, S3Server
from support import SMALL

from nodecache.cache import MANIFEST_NAME, FetchOptions, IntegrityError, ModelStore
from nodecache.cache.sources.base import RemoteFile, Sink
from nodecache.cache.sources.s3 import S3Source

awscrt = pytest.importorskip("awscrt.checksums")

CRC = {"CRC64NVME": awscrt.crc64nvme, "CRC32C": awscrt.crc32c, "CRC32": awscrt.crc32}
WIDTH = {"CRC64NVME": 16, "CRC32C": 8, "CRC32": 8}


def s3_client(server: S3Server) -> Any:
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    return {f["path"]: f for f in raw["files"]}


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32C", "CRC32"])
async def test_s3_objects_are_verified_by_their_crc_not_a_sha256(
    tmp_path: Path, s3: S3Server, algorithm: str
) -> None:
    files = {"weights.bin": os.urandom(700_001), "config.json": b'{"a": 1}'}
    client = s3_client(s3)
    for rel, data in files.items():
        client.put_object(
            Bucket=s3.bucket, Key=f"crc-{algorithm}/{rel}", Body=data, ChecksumAlgorithm=algorithm
        )
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"s3://{s3.bucket}/crc-{algorithm}")

    entries = manifest_files(model.path)
    for rel, data in files.items():
        assert (model.path / rel).read_bytes() == data
        want = f"{algorithm.lower()}:{CRC[algorithm](data):0{WIDTH[algorithm]}x}"
        assert entries[rel]["checksum"] == want
        assert "sha256" not in entries[rel]  # no sha256 of every byte was computed
    assert {f.checksum for f in model.files} == {entries[rel]["checksum"] for rel in files}
    # A single object URI goes through the HEAD path: the same check.
    single = await store.fetch(f"s3://{s3.bucket}/crc-{algorithm}/weights.bin")
    assert manifest_files(single.path)["weights.bin"]["checksum"].startswith(algorithm.lower())


async def test_s3_multipart_full_object_crc64nvme(tmp_path: Path, s3: S3Server) -> None:
    client = s3_client(s3)
    key = "multipart/weights.bin"
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(123_457)]
    upload = client.create_multipart_upload(
        Bucket=s3.bucket, Key=key, ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT"
    )
    done = []
    for number, data in enumerate(parts, 1):
        part = client.upload_part(
            Bucket=s3.bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="CRC64NVME",
        )
        done.append({"PartNumber": number, "ETag": part["ETag"]})
    client.complete_multipart_upload(
        Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"s3://{s3.bucket}/{key}")

    data = b"".join(parts)
    assert (model.path / "weights.bin").read_bytes() == data
    entry = manifest_files(model.path)["weights.bin"]
    assert entry["checksum"] == f"crc64nvme:{awscrt.crc64nvme(data):016x}"


async def test_s3_a_flipped_byte_in_one_range_fails_the_crc(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(700_001)
    s3_client(s3).put_object(
        Bucket=s3.bucket, Key="flipped/model.bin", Body=data, ChecksumAlgorithm="CRC64NVME"
    )
    real = S3Source.read_range

    def flipping(
        self: S3Source, remote: RemoteFile, start: int, end: int | None, sink: Sink
    ) -> int:
        def flip(offset: int, chunk: memoryview) -> None:
            if offset <= 300_000 < offset + len(chunk):
                changed = bytearray(chunk)
                changed[300_000 - offset] ^= 0x01
                chunk = memoryview(changed)
            sink(offset, chunk)

        return real(self, remote, start, end, flip)

    monkeypatch.setattr(S3Source, "read_range", flipping)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match=r"crc64nvme .* differs from the source's"):
        await store.fetch(f"s3://{s3.bucket}/flipped/model.bin")
    assert list((tmp_path / "cache" / "models").iterdir()) == []

    monkeypatch.setattr(S3Source, "read_range", real)
    model = await store.fetch(f"s3://{s3.bucket}/flipped/model.bin")
    assert (model.path / "model.bin").read_bytes() == data


async def test_gcs_objects_are_verified_by_crc32c(tmp_path: Path, gcs: Any) -> None:
    """(A corrupted object failing its crc32c: tests/test_cache_gcs.py.)"""
    data = os.urandom(600_001)
    gcs.pipe_file(f"{GCS_BUCKET}/crc/model.bin", data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"gs://{GCS_BUCKET}/crc/model.bin")

    entry = manifest_files(model.path)["model.bin"]
    assert entry["checksum"] == f"crc32c:{awscrt.crc32c(data):08x}"
    assert "sha256" not in entry


async def test_s3_resumed_parts_are_read_back_into_the_crc(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts kept from an interrupted fetch have no CRC in memory: they are read back from
    disk, so a byte that changed on disk meanwhile fails the check."""
    data = os.urandom(1_000_003)
    s3_client(s3).put_object(
        Bucket=s3.bucket, Key="resume/model.bin", Body=data, ChecksumAlgorithm="CRC32C"
    )
    uri = f"s3://{s3.bucket}/resume/model.bin"
    options = FetchOptions(
        chunk_size=64 * 1024,
        part_size=256 * 1024,
        concurrency=1,
        fsync=False,
        retries=0,
        journal_interval=0.01,
    )
    real = S3Source.read_range

    def failing(self: S3Source, remote: RemoteFile, start: int, end: int | None, sink: Sink) -> int:
        if start >= 512 * 1024:
            time.sleep(0.3)  # the journal records the parts before it (every 10 ms)
            raise ConnectionResetError("connection reset by peer")
        return real(self, remote, start, end, sink)

    monkeypatch.setattr(S3Source, "read_range", failing)
    store = ModelStore(tmp_path / "cache", options=options)
    with pytest.raises(Exception, match="reset"):
        await store.fetch(uri)
    monkeypatch.setattr(S3Source, "read_range", real)
    partial = [p for p in (tmp_path / "cache" / "tmp").rglob("model.bin") if p.is_file()]
    assert len(partial) == 1
    with open(partial[0], "r+b") as f:  # a kept part changed on disk
        f.seek(1000)
        f.write(bytes([data[1000] ^ 1]))

    seen: list[tuple[int, int | None]] = []
    with pytest.raises(IntegrityError, match=r"crc32c .* differs"):
        await store.fetch(uri, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[0][0] >= 256 * 1024  # part 0 was resumed, not fetched again

    model = await store.fetch(uri)  # the file was forgotten: fetched whole, verified
    assert (model.path / "model.bin").read_bytes() == data
    assert manifest_files(model.path)["model.bin"]["checksum"] == (
        f"crc32c:{awscrt.crc32c(data):08x}"
    )
