"""S3 COMPOSITE checksums (a multipart upload's CRC of its parts' CRCs) checked per upload
part and as the composite, and whole-object hashes that cannot be joined (SHA1 on
SeaweedFS; XXHASH3/64/128, which SeaweedFS refuses to store, from S3 answers as data)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import xxhash
from object_stores import ACCESS_KEY, SECRET_KEY, S3Server
from support import SMALL

from nodecache.cache import MANIFEST_NAME, FetchOptions, IntegrityError, ModelStore
from nodecache.cache.fetch import FetchedFile, Transfer
from nodecache.cache.journal import Journal
from nodecache.cache.sources import open_source
from nodecache.cache.sources.base import RemoteFile, Sink
from nodecache.cache.sources.s3 import S3Source
from nodecache.cache.sources.s3common import parse_object_parts, s3_remote

awscrt = pytest.importorskip("awscrt.checksums")
MiB = 1 << 20
UPLOAD = [5 * MiB, 5 * MiB, 12_345]
"""Upload part sizes: S3's smallest part, twice, and a short last one."""
# Our parts (3 MiB) straddle the upload parts' boundaries (5 MiB, 10 MiB).
OPTIONS = dataclasses.replace(SMALL, part_size=3 * MiB)
CRC = {"CRC32C": awscrt.crc32c, "CRC32": awscrt.crc32}


def b64(value: int, width: int = 4) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def s3_client(server: S3Server) -> Any:
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def upload_multipart(server: S3Server, key: str, data: bytes, algorithm: str) -> None:
    client = s3_client(server)
    upload = client.create_multipart_upload(
        Bucket=server.bucket, Key=key, ChecksumAlgorithm=algorithm
    )
    done, start = [], 0
    for number, size in enumerate(UPLOAD, 1):
        part = client.upload_part(
            Bucket=server.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
            Body=data[start : start + size], ChecksumAlgorithm=algorithm,
        )  # fmt: skip
        done.append({"PartNumber": number, "ETag": part["ETag"],
                     f"Checksum{algorithm}": part[f"Checksum{algorithm}"]})  # fmt: skip
        start += size
    client.complete_multipart_upload(
        Bucket=server.bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )


def composite(data: bytes, crc: Any) -> str:
    pieces, start = [], 0
    for size in UPLOAD:
        pieces.append(crc(data[start : start + size]).to_bytes(4, "big"))
        start += size
    return f"{crc(b''.join(pieces)):08x}-{len(UPLOAD)}"


def manifest_entry(folder: Path, path: str) -> dict[str, Any]:
    files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    return next(f for f in files if f["path"] == path)


@pytest.mark.parametrize("algorithm", ["CRC32C", "CRC32"])
async def test_s3_composite_crc_is_checked_per_upload_part(
    tmp_path: Path, s3: S3Server, algorithm: str
) -> None:
    """SeaweedFS publishes the composite (``<b64>-3``, type COMPOSITE) and, through
    GetObjectAttributes, the parts' sizes (not their CRCs): the file is verified by the
    composite, with no sha256 of every byte."""
    data = os.urandom(sum(UPLOAD))
    key = f"composite-{algorithm}/weights.bin"
    upload_multipart(s3, key, data, algorithm)
    store = ModelStore(tmp_path / "cache", options=OPTIONS)

    model = await store.fetch(f"s3://{s3.bucket}/{key}")

    assert (model.path / "weights.bin").read_bytes() == data
    entry = manifest_entry(model.path, "weights.bin")
    assert entry["checksum"] == f"{algorithm.lower()}:{composite(data, CRC[algorithm])}"
    assert "sha256" not in entry


async def test_s3_upload_parts_from_head_part_number_when_attributes_are_refused(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store (or a policy) that refuses GetObjectAttributes: the layout comes from one
    HEAD ``?partNumber=N`` per upload part, and the composite is checked all the same."""
    data = os.urandom(sum(UPLOAD))
    upload_multipart(s3, "composite-head/weights.bin", data, "CRC32C")
    real = S3Source._call
    asked: list[str] = []

    def refusing(self: S3Source, method: str, key: str, query: str = "", extra: Any = None) -> Any:
        asked.append(f"{method} ?{query}")
        if query.startswith("attributes"):
            return 501, None, b"<Error><Code>NotImplemented</Code></Error>"
        return real(self, method, key, query, extra)

    monkeypatch.setattr(S3Source, "_call", refusing)
    model = await ModelStore(tmp_path / "cache", options=OPTIONS).fetch(
        f"s3://{s3.bucket}/composite-head/weights.bin"
    )
    assert (model.path / "weights.bin").read_bytes() == data
    entry = manifest_entry(model.path, "weights.bin")
    assert entry["checksum"] == f"crc32c:{composite(data, awscrt.crc32c)}"
    assert [a for a in asked if "partNumber" in a] == [f"HEAD ?partNumber={n}" for n in (1, 2, 3)]


async def test_s3_composite_catches_a_flipped_byte(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(sum(UPLOAD))
    upload_multipart(s3, "composite-flip/weights.bin", data, "CRC32C")
    real = S3Source.read_range
    where = 5 * MiB + 1000  # in upload part 2, in our second 3 MiB part

    def flipping(
        self: S3Source, remote: RemoteFile, start: int, end: int | None, sink: Sink
    ) -> int:
        def flip(offset: int, chunk: memoryview) -> None:
            if offset <= where < offset + len(chunk):
                changed = bytearray(chunk)
                changed[where - offset] ^= 0x01
                chunk = memoryview(changed)
            sink(offset, chunk)

        return real(self, remote, start, end, flip)

    monkeypatch.setattr(S3Source, "read_range", flipping)
    store = ModelStore(tmp_path / "cache", options=OPTIONS)
    with pytest.raises(IntegrityError, match=r"composite crc32c \w+-3 differs from the source"):
        await store.fetch(f"s3://{s3.bucket}/composite-flip/weights.bin")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


async def test_s3_full_object_sha1_is_the_check(tmp_path: Path, s3: S3Server) -> None:
    import hashlib

    data = os.urandom(700_001)
    s3_client(s3).put_object(Bucket=s3.bucket, Key="sha1/model.bin", Body=data,
                             ChecksumAlgorithm="SHA1")  # fmt: skip
    model = await ModelStore(tmp_path / "cache", options=SMALL).fetch(
        f"s3://{s3.bucket}/sha1/model.bin"
    )
    entry = manifest_entry(model.path, "model.bin")
    assert entry["checksum"] == f"sha1:{hashlib.sha1(data).hexdigest()}"
    assert "sha256" not in entry


# ---- S3 answers as data: what AWS publishes and SeaweedFS does not ----------------------

# GetObjectAttributes with ObjectParts, as AWS answers it for a multipart upload made with
# CRC32C checksums (the API reference's shape; values for the bytes below), in two pages.
PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<GetObjectAttributesResponse xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <ObjectParts>
    <IsTruncated>{truncated}</IsTruncated><MaxParts>2</MaxParts>
    <NextPartNumberMarker>{next}</NextPartNumberMarker><PartNumberMarker>{marker}</PartNumberMarker>
    {parts}
    <PartsCount>3</PartsCount>
  </ObjectParts>
</GetObjectAttributesResponse>"""
PART = (
    "<Part><ChecksumCRC32C>{crc}</ChecksumCRC32C><PartNumber>{n}</PartNumber>"
    "<Size>{size}</Size></Part>"
)


def aws_parts(data: bytes) -> list[dict[str, Any]]:
    """The two pages of GetObjectAttributes for ``data`` uploaded in UPLOAD parts, parsed."""
    xml_parts, start = [], 0
    for n, size in enumerate(UPLOAD, 1):
        crc = b64(awscrt.crc32c(data[start : start + size]))
        xml_parts.append(PART.format(crc=crc, n=n, size=size))
        start += size
    first = PAGE.format(truncated="true", next=2, marker=0, parts="".join(xml_parts[:2]))
    second = PAGE.format(truncated="false", next=3, marker=2, parts=xml_parts[2])
    parts, marker = parse_object_parts(first.encode())
    assert marker == "2"
    more, marker = parse_object_parts(second.encode())
    assert marker is None
    return parts + more


def transfer_one(tmp_path: Path, data: bytes, publish: dict[str, Any]) -> FetchedFile:
    """Fetch ``data`` (a local file) as if S3 had published ``publish`` (HEAD headers,
    upload parts) for it: our parts run out of order, the last first."""
    src = tmp_path / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "w.bin").write_bytes(data)
    source = open_source(src.as_uri(), chunk_size=OPTIONS.chunk_size, timeout=5)
    (listed,) = source.list_files()
    published = s3_remote("w.bin", {"name": "b/w.bin", "size": len(data), **publish})
    remote = dataclasses.replace(
        listed, composite=published.composite, digest=published.digest, crc=published.crc
    )
    folder = tmp_path / "partial"
    folder.mkdir(exist_ok=True)
    options: FetchOptions = OPTIONS
    transfer = Transfer(source, [remote], folder, Journal(folder, source.uri, options.part_size),
                        options, on_bytes=lambda n: None, abort=threading.Event())  # fmt: skip
    transfer.prepare()
    try:
        for job, part in reversed(transfer.pending()):
            transfer.run_part(job, part)
        (fetched,) = transfer.finish()
        return fetched
    finally:
        transfer.close()


def test_aws_part_checksums_name_the_upload_part_that_differs(tmp_path: Path) -> None:
    data = os.urandom(sum(UPLOAD))
    head = {"checksum_type": "COMPOSITE", "checksum_crc32c": composite_b64(data),
            "ETag": '"0123456789abcdef0123456789abcdef-3"'}  # fmt: skip
    parts = aws_parts(data)
    assert [p["size"] for p in parts] == UPLOAD

    fetched = transfer_one(tmp_path / "good", data, {**head, "parts": parts})
    assert fetched.checksum == f"crc32c:{composite(data, awscrt.crc32c)}"

    bad = bytearray(data)
    bad[5 * MiB + 77] ^= 0x80  # in upload part 2
    with pytest.raises(IntegrityError, match=rf"crc32c of upload part 2 \(bytes {5 * MiB}-"):
        transfer_one(tmp_path / "bad", bytes(bad), {**head, "parts": parts})


def test_a_part_layout_that_does_not_add_up_is_not_trusted(tmp_path: Path) -> None:
    """Parts out of order, or fewer than the composite's count: no composite check (the
    file is then checked by size and its sha256 recorded, as before)."""
    data = os.urandom(sum(UPLOAD))
    head = {"checksum_type": "COMPOSITE", "checksum_crc32c": composite_b64(data)}
    parts = aws_parts(data)
    assert (
        s3_remote("w", {"name": "b/w", "size": len(data), **head, "parts": parts[:2]}).composite
        is None
    )
    shuffled = [parts[1], parts[0], parts[2]]
    assert (
        s3_remote("w", {"name": "b/w", "size": len(data), **head, "parts": shuffled}).composite
        is None
    )
    fetched = transfer_one(tmp_path, data, {**head, "parts": parts[:2]})
    assert fetched.sha256 is not None and fetched.checksum is None


def composite_b64(data: bytes) -> str:
    hexed, count = composite(data, awscrt.crc32c).split("-")
    return f"{b64(int(hexed, 16))}-{count}"


@pytest.mark.parametrize(
    ("name", "digest"),
    [("xxhash3", xxhash.xxh3_64), ("xxhash64", xxhash.xxh64), ("xxhash128", xxhash.xxh3_128)],
)
def test_s3_xxhash_checksums_are_folded_in_file_order(
    tmp_path: Path, name: str, digest: Any
) -> None:
    """A HEAD's ``x-amz-checksum-xxhash*`` (big-endian, as botocore computes them): our
    parts arrive out of order and are read back into the hash in file order."""
    data = os.urandom(2 * OPTIONS.part_size + 999)
    head = {f"checksum_{name}": base64.b64encode(digest(data).digest()).decode()}

    fetched = transfer_one(tmp_path / "good", data, head)
    assert fetched.checksum == f"{name}:{digest(data).hexdigest()}" and fetched.sha256 is None

    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError, match=rf"{name} \w+ differs from the source's"):
        transfer_one(tmp_path / "bad", bytes(bad), head)
