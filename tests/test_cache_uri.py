"""Source URI validation: what a person writing a declaration sees."""

from __future__ import annotations

import pytest

from nodecache.cache import (
    SUPPORTED_SCHEMES,
    CacheError,
    InvalidSourceError,
    ModelStore,
    redact_uri,
    validate_source_uri,
)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/models/resnet/", "s3://bucket/models/resnet"),
        ("S3://bucket/models/resnet", "s3://bucket/models/resnet"),
        ("gs://my_bucket/a/b.onnx", "gs://my_bucket/a/b.onnx"),
        ("file:///data//models/m/", "file:///data/models/m"),
        ("file://localhost/data/m", "file:///data/m"),
        ("HTTP://Example.COM:8080/models/m/", "http://example.com:8080/models/m/"),
        ("https://example.com/m.onnx?version=2", "https://example.com/m.onnx?version=2"),
        ("  s3://bucket/key  ", "s3://bucket/key"),
    ],
)
def test_valid_uris_are_normalised(uri: str, expected: str) -> None:
    assert validate_source_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("ftp://x", "unknown scheme 'ftp' in 'ftp://x'; supported: file, http, https, s3, gs"),
        ("", "empty source URI"),
        ("/data/models/m", "missing scheme"),
        ("s3:///key", "empty bucket"),
        ("s3://bucket", "missing path"),
        ("s3://bucket/", "missing path"),
        ("gs://Bad_Bucket!/x", "invalid bucket name"),
        ("http:///m.onnx", "empty host"),
        ("https://example.com", "missing path"),
        ("file://", "missing path"),
        ("file://data/models", "three slashes"),
        ("s3://bucket/a/../b", "'..' path segment"),
        ("http://example.com/a/../b", "'..' path segment"),
        ("s3://bucket/a\nb", "control characters"),
        ("s3://bucket/a?versionId=1", "query"),
        ("http://example.com:99999/m", "malformed host"),
        ("https://example.com/m#frag", "fragment"),
    ],
)
def test_invalid_uris_are_refused_with_a_clear_message(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidSourceError) as info:
        validate_source_uri(uri)
    assert fragment in str(info.value)
    assert isinstance(info.value, CacheError)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OSError)


def test_missing_scheme_suggests_file_uri() -> None:
    with pytest.raises(InvalidSourceError, match="file:///data/m"):
        validate_source_uri("/data/m")


def test_every_supported_scheme_is_named_in_the_message() -> None:
    with pytest.raises(InvalidSourceError) as info:
        validate_source_uri("ftp://host/model")
    for scheme in SUPPORTED_SCHEMES:
        assert scheme in str(info.value)


def test_credentials_in_uri_are_refused_and_never_echoed() -> None:
    with pytest.raises(InvalidSourceError) as info:
        validate_source_uri("https://alice:hunter2@example.com/m.onnx")
    assert "hunter2" not in str(info.value)
    assert "alice" not in str(info.value)
    assert "credentials" in str(info.value)


def test_redact_masks_user_info_and_query() -> None:
    shown = redact_uri("https://u:secret@host/m.onnx?X-Amz-Signature=abc")
    assert "secret" not in shown
    assert "abc" not in shown
    assert shown.startswith("https://***@host/m.onnx")


def test_keys_are_stable_safe_and_shared_by_equal_sources() -> None:
    a = ModelStore.key_for("s3://bucket/models/resnet-50/")
    assert a == ModelStore.key_for("S3://bucket/models/resnet-50")
    assert a != ModelStore.key_for("s3://bucket/models/resnet-51")
    assert a.startswith("resnet-50-")
    # http folder and file URLs are different sources.
    assert ModelStore.key_for("http://h/m/") != ModelStore.key_for("http://h/m")
    for uri in ("https://h/w?x=1&y=/../..", "file:///a b/ü/.hidden", "gs://bkt/x"):
        key = ModelStore.key_for(uri)
        assert "/" not in key
        assert not key.startswith(".")
        assert key.isascii()


def test_key_for_refuses_invalid_uri() -> None:
    with pytest.raises(InvalidSourceError):
        ModelStore.key_for("ftp://x/y")
