"""``hf://`` against a fake Hub on loopback (tests/hfhub.py).

The fake is proven first: ``huggingface_hub``'s own ``snapshot_download`` gets identical
bytes from it by branch, tag and commit. Then our source against it: the revision resolved
once, LFS files checked by sha256 and the others by git blob sha1, include/exclude, the
token kept off the CDN, and every failure a clear permanent error without the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hfhub import FakeHub, git_blob_sha1

from nodecache.cache import (
    MANIFEST_NAME,
    CacheError,
    FetchError,
    FetchOptions,
    IntegrityError,
    InvalidSourceError,
    ModelStore,
)
from nodecache.cache.sources import open_source
from nodecache.cache.sources.hf import HfSource
from nodecache.cache.uri import validate_source_uri

REPO = "acme/tiny-llm"
FILES = {
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "config.json": b'{"layers": 2}\n',
    "model.safetensors": os.urandom(700_001),
    "original/consolidated.pth": os.urandom(50_000),
    "tokenizer/vocab with space+ü.txt": b"a\nb\n",
    "empty.txt": b"",
}
SMALL = FetchOptions(
    chunk_size=64 * 1024,
    part_size=256 * 1024,
    fsync=False,
    retries=1,
    backoff_base=0.01,
    backoff_max=0.02,
)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A fresh fake Hub with REPO at main (v1 tag) and a second commit on main; no token
    from this machine's environment or token file."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with FakeHub(page_size=2) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "cache", options=SMALL)


def _fetch(store: ModelStore, uri: str, **credentials: str) -> dict[str, bytes]:
    model = asyncio.run(store.fetch(uri, credentials=credentials or None))
    return {
        p.relative_to(model.path).as_posix(): p.read_bytes()
        for p in model.path.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }


def _source(uri: str, **credentials: str) -> HfSource:
    source = open_source(uri, chunk_size=64 * 1024, timeout=10, credentials=credentials or None)
    assert isinstance(source, HfSource)
    return source


# -- the fake, proven by huggingface_hub itself ------------------------------------------


@pytest.mark.parametrize("revision", ["main", "v1", "commit"])
def test_huggingface_hub_downloads_identical_bytes_from_the_fake(
    hub: FakeHub, tmp_path: Path, revision: str
) -> None:
    from huggingface_hub import snapshot_download

    first = hub.commit(REPO, FILES, private=True)
    hub.tag(REPO, "v1", first)
    later = {**FILES, "config.json": b'{"layers": 3}\n'}
    hub.commit(REPO, later)
    want, rev = {"main": (later, "main"), "v1": (FILES, "v1"), "commit": (FILES, first)}[revision]

    out = snapshot_download(
        REPO,
        revision=rev,
        endpoint=hub.endpoint,
        token=hub.token,
        local_dir=tmp_path / "snap",
        cache_dir=tmp_path / "hf-cache",
    )

    got = {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in Path(out).rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(out).parts
    }
    assert got == want
    assert hub.requests("GET", auth=True), "the Hub got the token"
    cdn = [p for p in hub.requests() if p.startswith("/repos/")]
    assert cdn and not any(p in hub.requests(auth=True) for p in cdn), "never to the CDN"


def test_huggingface_hub_sees_the_fakes_errors_as_the_hubs() -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with FakeHub() as hub:
        hub.commit(REPO, FILES, private=True)
        api = HfApi(endpoint=hub.endpoint, token=False)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(REPO)  # private, no token: 401 RepoNotFound
        authed = HfApi(endpoint=hub.endpoint, token=hub.token)
        with pytest.raises(RevisionNotFoundError):
            authed.model_info(REPO, revision="nope")
        with pytest.raises(RepositoryNotFoundError):
            authed.model_info("acme/missing")
        with pytest.raises(HfHubHTTPError) as wrong:
            HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info(REPO)
        assert wrong.value.response.status_code == 401


# -- URIs -----------------------------------------------------------------------------------


def test_uri_forms_normalise_to_one_key() -> None:
    assert validate_source_uri("hf://acme/tiny-llm") == "hf://acme/tiny-llm"
    assert validate_source_uri("HF://acme/tiny-llm@v1.0") == "hf://acme/tiny-llm@v1.0"
    assert validate_source_uri("hf://acme/tiny-llm:v1.0") == "hf://acme/tiny-llm@v1.0"  # KServe
    assert validate_source_uri("hf://acme/m@refs/pr/1") == "hf://acme/m@refs/pr/1"


@pytest.mark.parametrize(
    "uri",
    [
        "hf://acme",
        "hf://acme/",
        "hf://acme/m/sub/path",
        "hf://acme/m@",
        "hf://acme/m@a..b",
        "hf://acme/m@main?x=1",
        "hf://ac--me/m",
        "hf://-acme/m",
        "hf://acme/m@has space",
        "hf://hf_secret@acme/m",
    ],
)
def test_bad_uris_are_refused_up_front(uri: str) -> None:
    with pytest.raises(InvalidSourceError) as info:
        validate_source_uri(uri)
    assert "hf_secret" not in str(info.value)


# -- the source -----------------------------------------------------------------------------


def test_listing_resolves_the_revision_once_and_publishes_checksums(hub: FakeHub) -> None:
    sha = hub.commit(REPO, FILES)
    source = _source(f"hf://{REPO}")
    try:
        listing = source.list_files()
        hub.commit(REPO, {"config.json": b"moved"})  # main moves after the listing
        assert source.list_files() == listing  # a retried listing keeps the commit
    finally:
        source.close()

    assert source.commit == sha and source.resolved == f"commit {sha}"
    assert len(hub.requests("GET")) > 2 and sum("/revision/" in p for p in hub.requests()) == 1
    by_path = {f.path: f for f in listing}
    assert sorted(by_path) == sorted(FILES)
    for path, data in FILES.items():
        remote = by_path[path]
        assert remote.size == len(data) and sha in remote.url
        if path.endswith((".safetensors", ".pth")):
            assert (remote.sha256, remote.git_sha1) == (hashlib.sha256(data).hexdigest(), None)
        else:
            assert (remote.sha256, remote.git_sha1) == (None, git_blob_sha1(data))


@pytest.mark.parametrize("form", ["hf://{repo}", "hf://{repo}@v1", "hf://{repo}:{sha}"])
def test_the_store_fetches_identical_bytes_pinned_to_the_commit(
    hub: FakeHub, tmp_path: Path, form: str
) -> None:
    sha = hub.commit(REPO, FILES)
    hub.tag(REPO, "v1", sha)

    got = _fetch(_store(tmp_path), form.format(repo=REPO, sha=sha))

    assert got == FILES
    byte_paths = [p for p in hub.requests("GET") if "/resolve/" in p]
    assert byte_paths and all(f"/resolve/{sha}/" in p for p in byte_paths)


def test_include_and_exclude_choose_files(hub: FakeHub, tmp_path: Path) -> None:
    hub.commit(REPO, FILES)
    store = _store(tmp_path)

    got = _fetch(store, f"hf://{REPO}", exclude="original/*, .gitattributes")
    assert sorted(got) == sorted(set(FILES) - {"original/consolidated.pth", ".gitattributes"})

    source = _source(f"hf://{REPO}", include="*.json,tokenizer/")
    try:
        assert [f.path for f in source.list_files()] == ["config.json", sorted(FILES)[-1]]
    finally:
        source.close()
    source = _source(f"hf://{REPO}", include="*.gguf")
    with pytest.raises(FetchError, match="include/exclude leave none of the 6 files"):
        source.list_files()


def test_a_private_repo_needs_the_token_and_the_cdn_never_sees_it(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.commit(REPO, FILES, private=True)
    store = _store(tmp_path)

    with pytest.raises(FetchError) as anonymous:
        _fetch(store, f"hf://{REPO}")
    assert "no HF_TOKEN was given" in str(anonymous.value) and anonymous.value.permanent

    assert _fetch(store, f"hf://{REPO}", HF_TOKEN=hub.token) == FILES
    cdn = [p for p in hub.requests() if p.startswith("/repos/")]
    assert cdn and not set(cdn) & set(hub.requests(auth=True))


def test_the_token_comes_from_the_environment_as_huggingface_hub_reads_it(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.commit(REPO, FILES, private=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)

    assert _fetch(_store(tmp_path), f"hf://{REPO}") == FILES


@pytest.mark.parametrize(
    ("uri", "credentials", "expected"),
    [
        ("hf://acme/missing", {}, "repository 'acme/missing' on http"),
        ("hf://{repo}@nope", {}, "revision 'nope' not found in 'acme/tiny-llm'"),
        ("hf://{repo}", {"HF_TOKEN": "hf_wrong_but_secret"}, "refused HF_TOKEN: invalid"),
        ("hf://acme/missing", {"HF_TOKEN": "{token}"}, "HF_TOKEN lacks access"),
    ],
)
def test_failures_are_permanent_clear_and_keep_the_token_out(
    hub: FakeHub, tmp_path: Path, uri: str, credentials: dict[str, str], expected: str
) -> None:
    hub.commit(REPO, FILES)
    credentials = {k: v.format(token=hub.token) for k, v in credentials.items()}
    store = _store(tmp_path)

    with pytest.raises(CacheError) as info:
        _fetch(store, uri.format(repo=REPO), **credentials)

    message = str(info.value)
    assert expected in message and getattr(info.value, "permanent", True)
    assert "hf_wrong_but_secret" not in message and hub.token not in message
    assert not list((tmp_path / "cache" / "models").iterdir()), "nothing published"


@pytest.mark.parametrize(
    ("path", "check"),
    [("model.safetensors", "sha256"), ("config.json", "git blob sha1")],
)
def test_bytes_that_differ_from_the_published_checksum_are_refused(
    hub: FakeHub, tmp_path: Path, path: str, check: str
) -> None:
    hub.commit(REPO, FILES)
    hub.corrupt.add(path)
    store = _store(tmp_path)

    with pytest.raises(IntegrityError, match=f"{path!r} of hf://{REPO}: {check} [0-9a-f]+ differs"):
        _fetch(store, f"hf://{REPO}")
    assert not list((tmp_path / "cache" / "models").iterdir()), "nothing published"

    hub.corrupt.clear()
    assert _fetch(store, f"hf://{REPO}") == FILES, "a later fetch starts clean"


def test_an_unreachable_endpoint_is_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("HF_TOKEN", raising=False)

    with pytest.raises(FetchError) as info:
        _fetch(_store(tmp_path), f"hf://{REPO}")
    assert not info.value.permanent


def test_the_commit_is_recorded_for_status_and_survives_a_restart(
    hub: FakeHub, tmp_path: Path
) -> None:
    sha = hub.commit(REPO, FILES)
    uri = f"hf://{REPO}@main"

    model = asyncio.run(_store(tmp_path).fetch(uri))
    hub.commit(REPO, {"config.json": b"moved"})  # main moves: the copy on disk does not
    again = _store(tmp_path).lookup(uri)

    assert model.resolved == f"commit {sha}"
    assert again is not None and again.resolved == f"commit {sha}" and again.files == model.files


def test_node_status_shows_the_resolved_commit() -> None:
    from nodecache.agent.kube.nodestatus import node_status

    agent = {
        "models": [
            {"name": "m", "state": "Downloaded", "source": "hf://acme/m@main", "bytes": 5,
             "bytesTotal": 5, "resolved": "commit " + "a" * 40},
        ],
    }  # fmt: skip
    status = node_status(
        agent, disk={"total": 1, "free": 1}, origins={"m": "LocalModelCache/m"}, errors={}
    )

    assert status["modelStatus"]["m"]["resolved"] == "commit " + "a" * 40
