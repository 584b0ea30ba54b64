"""Azure Blob sources (``az://``, ``abfs[s]://``, ``https://ACCOUNT.blob.core.windows.net``)
against Azurite on loopback: every URI form, every way of authenticating that an emulator
can check, and the errors a person must be able to act on."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azurite import ACCOUNT, ACCOUNT_KEY, CONTAINER, AzuriteServer
from support import SMALL

from nodecache.cache import (
    MANIFEST_NAME,
    FetchError,
    IntegrityError,
    InvalidSourceError,
    ModelStore,
)
from nodecache.cache.sources import open_source
from nodecache.cache.sources.azure import AzureSource, mask_azure_secrets
from nodecache.cache.uri import redact_uri, validate_source_uri

FILES = {
    "config.json": b'{"layers": 2}',
    "weights/model.safetensors": os.urandom(700_001),
    "tokenizer/vocab.txt": b"a\nb\n",
}
BAD_KEY = "QmFkS2V5" * 11 + "AAAA"


def _read_model(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _seed(azure: AzuriteServer, files: dict[str, bytes] = FILES) -> str:
    """``files`` under a fresh prefix of the container (single-shot uploads: Content-MD5)."""
    prefix = f"m-{uuid.uuid4().hex[:8]}"
    container = azure.container()
    for rel, data in files.items():
        container.upload_blob(f"{prefix}/{rel}", data, overwrite=True)
    return prefix


def _sas(permission: str = "rl", *, expiry: timedelta = timedelta(hours=1)) -> str:
    from azure.storage.blob import generate_container_sas

    return generate_container_sas(
        ACCOUNT,
        CONTAINER,
        account_key=ACCOUNT_KEY,
        permission=permission,
        expiry=datetime.now(UTC) + expiry,
    )


# -- URIs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("az://models/mlp/", "az://models/mlp"),
        (
            "abfss://models@Acct1.dfs.core.windows.net/mlp/",
            "abfss://models@acct1.dfs.core.windows.net/mlp",
        ),
        ("abfs://models@acct1.blob.core.windows.net/a/b", "abfs://models@acct1.blob.core.windows.net/a/b"),
        ("https://acct1.blob.core.windows.net/models/m.onnx", "https://acct1.blob.core.windows.net/models/m.onnx"),
        ("https://acct1.blob.core.chinacloudapi.cn/models/m", "https://acct1.blob.core.chinacloudapi.cn/models/m"),
    ],
)  # fmt: skip
def test_azure_uris_normalise(uri: str, normal: str) -> None:
    assert validate_source_uri(uri) == normal


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("az://models", "missing path"),
        ("az://Models/x", "invalid container name"),
        ("az://mo--dels/x", "invalid container name"),
        ("abfss://acct1.dfs.core.windows.net/x", "missing container"),
        ("abfss://models@acct1.example.com/x", "expected"),
        ("abfss://models@a.dfs.core.windows.net/x", "invalid storage account"),
        ("abfss://user:pw@acct1.dfs.core.windows.net/x", "credentials embedded"),
        ("https://acct1.blob.core.windows.net/models", "missing path"),
        ("https://acct1.blob.core.windows.net:8443/models/x", "unexpected port"),
        ("az://models/a/../b", "'..' path segment"),
        ("az://models/a//b", "empty path segment"),
    ],
)  # fmt: skip
def test_bad_azure_uris_are_refused(uri: str, says: str) -> None:
    with pytest.raises(InvalidSourceError, match=says) as info:
        validate_source_uri(uri)
    assert "pw" not in str(info.value)


def test_a_sas_in_the_uri_is_refused_without_showing_it() -> None:
    uri = "https://acct1.blob.core.windows.net/models/m.onnx?sv=2021&sig=SECRETSIG%3D"
    with pytest.raises(InvalidSourceError, match="AZURE_STORAGE_SAS_TOKEN") as info:
        validate_source_uri(uri)
    assert "SECRETSIG" not in str(info.value)


def test_only_blob_hosts_leave_the_http_source() -> None:
    assert validate_source_uri("https://example.com/models/x") == "https://example.com/models/x"
    assert validate_source_uri("http://acct1.blob.core.windows.net/m/x").startswith("http://")


def test_abfs_container_is_not_masked_as_user_info() -> None:
    uri = "abfss://models@acct1.dfs.core.windows.net/mlp"
    assert redact_uri(uri) == uri
    assert "pw" not in redact_uri("abfss://user:pw@acct1.dfs.core.windows.net/mlp")


def test_secrets_are_masked_in_text() -> None:
    text = "GET /c/b?sv=2021&sig=abc%2Bdef&se=x AccountKey=Zm9v==;SharedAccessSignature=sv=1&sig=q"
    masked = mask_azure_secrets(text)
    assert "abc" not in masked and "Zm9v" not in masked and "sig=q" not in masked
    assert "sv=2021" in masked


# -- every URI form reaches the disk with identical bytes ---------------------------------


@pytest.mark.parametrize(
    "form",
    [
        "az://models/{p}",
        "abfs://models@devstoreaccount1.dfs.core.windows.net/{p}",
        "abfss://models@devstoreaccount1.dfs.core.windows.net/{p}/",
        "https://devstoreaccount1.blob.core.windows.net/models/{p}",
    ],
)
async def test_every_uri_form_fetches_byte_for_byte(
    tmp_path: Path, azure: AzuriteServer, form: str
) -> None:
    prefix = _seed(azure)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(form.format(p=prefix))

    assert _read_model(model.path) == FILES
    assert {f.path: f.sha256 for f in model.files} == {
        p: hashlib.sha256(d).hexdigest() for p, d in FILES.items()
    }


async def test_single_blob(tmp_path: Path, azure: AzuriteServer) -> None:
    prefix = _seed(azure)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"az://{CONTAINER}/{prefix}/weights/model.safetensors")

    assert _read_model(model.path) == {"model.safetensors": FILES["weights/model.safetensors"]}


# -- ways to authenticate -------------------------------------------------------------------


def _env_without_connection_string(monkeypatch: pytest.MonkeyPatch, azure: AzuriteServer) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", azure.endpoint)


async def test_account_key_from_the_environment(
    tmp_path: Path, azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _seed(azure)
    _env_without_connection_string(monkeypatch, azure)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"az://{CONTAINER}/{prefix}")

    assert _read_model(model.path) == FILES


async def test_sas_token_from_the_environment(
    tmp_path: Path, azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _seed(azure)
    _env_without_connection_string(monkeypatch, azure)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + _sas())
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"az://{CONTAINER}/{prefix}")

    assert _read_model(model.path) == FILES


async def test_the_storage_secret_wins_over_the_environment(
    tmp_path: Path, azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _seed(azure)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure.connection_string(BAD_KEY))
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(
        f"az://{CONTAINER}/{prefix}",
        credentials={"AZURE_STORAGE_CONNECTION_STRING": azure.connection_string()},
    )

    assert _read_model(model.path) == FILES


async def test_wrong_key_is_permanent_and_never_shown(
    tmp_path: Path, azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _seed(azure)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure.connection_string(BAD_KEY))
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"az://{CONTAINER}/{prefix}")

    message = str(info.value)
    assert info.value.permanent, message
    assert "403" in message and "account key" in message
    assert BAD_KEY not in message and BAD_KEY[:12] not in message
    assert not list((tmp_path / "cache").rglob("model.safetensors"))


async def test_a_tampered_sas_is_refused_with_the_signature_masked(
    tmp_path: Path, azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _seed(azure)
    _env_without_connection_string(monkeypatch, azure)
    sas = _sas().replace("sig=", "sig=AAAA")
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", sas)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"az://{CONTAINER}/{prefix}")

    message = str(info.value)
    assert info.value.permanent, message
    assert "sig=" not in message or "sig=***" in message
    assert sas.split("sig=")[1][:10] not in message


async def test_a_sas_that_cannot_read_fails_on_the_bytes_clearly(
    azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed with a SAS that may read, then read with a list-only one: the ranged GET
    answers 403, and the error shows no SAS."""
    from nodecache.cache.sources.azure import _Auth

    prefix = _seed(azure)
    _env_without_connection_string(monkeypatch, azure)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", _sas())
    sas = _sas("l")
    source = open_source(f"az://{CONTAINER}/{prefix}", chunk_size=65536, timeout=10)
    try:
        remote = source.list_files()[0]
        assert isinstance(source, AzureSource)
        source.auth = _Auth(account=ACCOUNT, container=CONTAINER, sas=sas)
        with pytest.raises(Exception) as info:
            source.read_range(remote, 0, None, lambda offset, data: None)
    finally:
        source.close()

    from nodecache.cache.sources import translate_error

    error = translate_error(info.value, source.uri)
    assert getattr(error, "permanent", False), error
    assert "403" in str(error)
    assert sas.split("sig=")[1][:10] not in str(error)


async def test_anonymous_access_to_a_private_container_is_refused(
    tmp_path: Path, azure: AzuriteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _seed(azure)
    _env_without_connection_string(monkeypatch, azure)
    monkeypatch.setenv("AZURE_STORAGE_ANON", "true")
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError) as info:
        await store.fetch(f"az://{CONTAINER}/{prefix}")

    assert info.value.permanent and "403" in str(info.value)


def test_az_without_an_account_says_where_to_name_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AZURE_"):
            monkeypatch.delenv(name)
    with pytest.raises(FetchError, match="AZURE_STORAGE_ACCOUNT_NAME") as info:
        open_source("az://models/mlp", chunk_size=65536, timeout=5)
    assert info.value.permanent


def test_a_connection_string_for_another_account_is_refused(azure: AzuriteServer) -> None:
    with pytest.raises(FetchError, match="'otheracct'") as info:
        open_source(
            "https://otheracct.blob.core.windows.net/models/mlp", chunk_size=65536, timeout=5
        )
    assert ACCOUNT_KEY[:10] not in str(info.value)


def test_token_headers_are_refreshed_before_expiry() -> None:
    """The AD path (no AD here): the bearer token is fetched once and renewed near expiry."""
    from nodecache.cache.sources.azure import _Auth

    class Credential:
        calls = 0

        def get_token(self, scope: str) -> Any:
            Credential.calls += 1
            lifetime = 100 if Credential.calls == 1 else 3600
            return type("T", (), {"token": f"t{Credential.calls}", "expires_on": _now() + lifetime})

    auth = _Auth(account=ACCOUNT, container=CONTAINER, credential=Credential())
    first = auth.headers("GET", "https://x/")
    second = auth.headers("GET", "https://x/")
    third = auth.headers("GET", "https://x/")

    assert first["Authorization"] == "Bearer t1"  # expires in 100 s: renewed next time
    assert second["Authorization"] == third["Authorization"] == "Bearer t2"
    assert auth.query() == ""


def _now() -> float:
    import time

    return time.time()


# -- missing things ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["nocontainer/{p}/x", "models/{p}/absent.bin", "models/{p}-no"])
async def test_missing_container_blob_or_folder_is_permanent(
    tmp_path: Path, azure: AzuriteServer, where: str
) -> None:
    prefix = _seed(azure)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(FetchError, match="nothing at") as info:
        await store.fetch("az://" + where.format(p=prefix))

    assert info.value.permanent


# -- verification -----------------------------------------------------------------------------


async def test_content_md5_is_published_and_checked(tmp_path: Path, azure: AzuriteServer) -> None:
    from azure.storage.blob import ContentSettings

    prefix = _seed(azure)
    blob = azure.container().get_blob_client(f"{prefix}/weights/model.safetensors")
    source = open_source(f"az://{CONTAINER}/{prefix}", chunk_size=65536, timeout=10)
    try:
        listed = {f.path: f.md5 for f in source.list_files()}
        assert isinstance(source, AzureSource)
        assert source.verified_by == "Content-MD5 published by Azure"
        assert source.resolved == "checked by Content-MD5 published by Azure"  # for status
    finally:
        source.close()
    assert listed == {p: hashlib.md5(d).hexdigest() for p, d in FILES.items()}
    # The bytes stay, the published MD5 becomes another one.
    blob.set_http_headers(ContentSettings(content_md5=hashlib.md5(b"other").digest()))
    store = ModelStore(tmp_path / "cache", options=SMALL)

    with pytest.raises(IntegrityError, match="MD5") as info:
        await store.fetch(f"az://{CONTAINER}/{prefix}")

    assert "model.safetensors" in str(info.value)
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models").iterdir()
    )


async def test_a_blob_without_md5_is_checked_by_size_and_its_digest_recorded(
    tmp_path: Path, azure: AzuriteServer
) -> None:
    """Blobs committed from blocks carry no Content-MD5: fetched, size-checked, and the
    sha256 of the first download is what the manifest records."""
    prefix = f"m-{uuid.uuid4().hex[:8]}"
    data = os.urandom(600_000)
    blob = azure.container().get_blob_client(f"{prefix}/model.bin")
    from azure.storage.blob import BlobBlock

    ids = []
    for i in range(3):
        block = f"{i:06d}"
        blob.stage_block(block, data[i * 200_000 : (i + 1) * 200_000])
        ids.append(BlobBlock(block))
    blob.commit_block_list(ids)
    source = open_source(f"az://{CONTAINER}/{prefix}", chunk_size=65536, timeout=10)
    try:
        [remote] = source.list_files()
        assert isinstance(source, AzureSource)
        assert "sha256 recorded at first download" in source.verified_by
        assert source.resolved == f"checked by {source.verified_by}"  # for status
    finally:
        source.close()
    assert remote.md5 is None and remote.size == len(data)
    store = ModelStore(tmp_path / "cache", options=SMALL)

    model = await store.fetch(f"az://{CONTAINER}/{prefix}")

    assert (model.path / "model.bin").read_bytes() == data
    assert [f.sha256 for f in model.files] == [hashlib.sha256(data).hexdigest()]
    # What status shows (the manifest's resolved), after a restart too.
    assert model.resolved and model.resolved.startswith("checked by size; sha256 recorded")
    again = ModelStore(tmp_path / "cache", options=SMALL).lookup(f"az://{CONTAINER}/{prefix}")
    assert again is not None and again.resolved == model.resolved


def test_a_blob_replaced_after_listing_is_an_integrity_error(azure: AzuriteServer) -> None:
    prefix = _seed(azure)
    source = open_source(
        f"az://{CONTAINER}/{prefix}/weights/model.safetensors", chunk_size=65536, timeout=10
    )
    try:
        [remote] = source.list_files()
        azure.container().upload_blob(
            f"{prefix}/weights/model.safetensors", os.urandom(700_001), overwrite=True
        )
        with pytest.raises(IntegrityError, match="changed on the source"):
            source.read_range(remote, 0, 1000, lambda offset, data: None)
    finally:
        source.close()


def test_the_source_is_azure_for_every_form(azure: AzuriteServer) -> None:
    for uri in (
        "az://models/x",
        "abfss://models@devstoreaccount1.dfs.core.windows.net/x",
        "https://devstoreaccount1.blob.core.windows.net/models/x",
    ):
        source = open_source(uri, chunk_size=65536, timeout=5)
        try:
            assert isinstance(source, AzureSource)
            assert source.endpoint == azure.endpoint
        finally:
            source.close()


# -- the agent, end to end --------------------------------------------------------------------


def test_the_agent_serves_an_onnx_model_from_azure(
    agent: Any, azure: AzuriteServer, mlp_dir: Path
) -> None:
    """abfss:// to Warm through a real agent (it inherits the connection string), an
    inference answered; a missing blob is an Error whose reason says so, with no key."""
    import numpy as np
    import onnxruntime as ort
    from support import declaration

    prefix = _seed(azure, {"model.onnx": (mlp_dir / "model.onnx").read_bytes()})
    agent.start()
    uri = f"abfss://{CONTAINER}@{ACCOUNT}.dfs.core.windows.net/{prefix}"
    agent.declare("mlp.yaml", declaration("mlp", uri))
    agent.declare("gone.yaml", declaration("gone", f"az://{CONTAINER}/{prefix}-absent"))

    agent.wait_state("mlp", "Warm")
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": x.ravel().tolist()}]}  # fmt: skip
    code, answer = agent.request("POST", "/v2/models/mlp/infer", body)
    assert code == 200, answer
    expected = ort.InferenceSession(str(mlp_dir / "model.onnx")).run(None, {"input": x})[0]
    got = np.array(answer["outputs"][0]["data"]).reshape(2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    gone = agent.wait_state("gone", "Error")
    assert "nothing at" in json.dumps(gone)
    assert ACCOUNT_KEY[:16] not in json.dumps(agent.status())
