"""Docker credential helpers (``credHelpers``, ``credsStore``) for ``oci://``: a small
``docker-credential-nctest`` on PATH answering for the real registry with htpasswd auth."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from oci_registry import (  # noqa: F401 - the fixture
    OCI_TAR_GZIP,
    PASSWORD,
    USER,
    Registry,
    auth_registry_fixture,
)
from support import SMALL

from nodecache.cache import FetchError, ModelStore
from nodecache.cache.ociref import DOCKER_HUB
from nodecache.cache.sources import ociauth

HELPER = f"""#!{sys.executable}
# docker-credential-nctest: answers from creds.json next to it, logs what it was asked.
import json, pathlib, sys, time
here = pathlib.Path(__file__).parent
server = sys.stdin.read().strip()
assert sys.argv[1:] == ["get"], sys.argv
with open(here / "asked.log", "a") as log:
    log.write(server + "\\n")
creds = json.loads((here / "creds.json").read_text())
answer = creds.get(server)
if answer == "sleep":
    time.sleep(30)
if answer == "crash":
    print("boom, and here is the password: " + {PASSWORD!r}, file=sys.stderr)
    sys.exit(3)
if answer == "garbage":
    print("not json")
    sys.exit(0)
if answer is None:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({{"ServerURL": server, "Username": answer[0], "Secret": answer[1]}}))
"""
MODEL = b"weights " * 2000


@pytest.fixture
def helper_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on PATH holding docker-credential-nctest (no creds yet)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "docker-credential-nctest"
    script.write_text(HELPER)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (folder / "creds.json").write_text("{}")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no config of this machine's user
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return folder


@pytest.fixture(scope="module")
def image(oci_registry_auth: Registry) -> str:
    """An image on the registry that needs a login, as ``oci://`` URI."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("models/model.bin")
        info.size = len(MODEL)
        tar.addfile(info, io.BytesIO(MODEL))
    oci_registry_auth.push_image("helped:v1", [(gzip.compress(out.getvalue()), OCI_TAR_GZIP)])
    return f"oci://{oci_registry_auth.host}/helped:v1"


def answers(helper_dir: Path, creds: dict[str, object]) -> None:
    (helper_dir / "creds.json").write_text(json.dumps(creds))


def config(tmp_path: Path, doc: dict[str, object]) -> dict[str, str]:
    """Credentials naming a docker config holding ``doc``."""
    path = tmp_path / f"config-{os.urandom(3).hex()}.json"
    path.write_text(json.dumps(doc))
    return {"REGISTRY_AUTH_FILE": str(path)}


def asked(helper_dir: Path) -> list[str]:
    log = helper_dir / "asked.log"
    return log.read_text().split() if log.exists() else []


async def fetch(tmp_path: Path, uri: str, credentials: dict[str, str]) -> bytes:
    store = ModelStore(tmp_path / f"cache-{os.urandom(3).hex()}", options=SMALL)
    model = await store.fetch(uri, credentials=credentials)
    return (model.path / "model.bin").read_bytes()


async def test_cred_helpers_name_the_helper_for_the_registry(
    tmp_path: Path, helper_dir: Path, oci_registry_auth: Registry, image: str
) -> None:
    host = oci_registry_auth.host
    answers(helper_dir, {host: [USER, PASSWORD]})
    creds = config(tmp_path, {"credHelpers": {host: "nctest"}})

    assert await fetch(tmp_path, image, creds) == MODEL
    assert asked(helper_dir) == [host]  # the server on stdin, once


async def test_creds_store_answers_for_every_registry(
    tmp_path: Path, helper_dir: Path, oci_registry_auth: Registry, image: str
) -> None:
    host = oci_registry_auth.host
    answers(helper_dir, {host: [USER, PASSWORD]})
    # What `docker login` writes with a credsStore: an empty marker in auths.
    creds = config(tmp_path, {"credsStore": "nctest", "auths": {host: {}}})

    assert await fetch(tmp_path, image, creds) == MODEL


async def test_a_store_without_the_login_falls_through_to_the_next_config(
    tmp_path: Path,
    helper_dir: Path,
    oci_registry_auth: Registry,
    image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert oci_registry_auth.config is not None
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(oci_registry_auth.config.read_text())
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    creds = config(tmp_path, {"credsStore": "nctest"})  # holds nothing for this registry

    assert await fetch(tmp_path, image, creds) == MODEL
    assert asked(helper_dir) == [oci_registry_auth.host]


async def test_a_wrong_secret_from_a_helper_is_refused_without_showing_it(
    tmp_path: Path, helper_dir: Path, oci_registry_auth: Registry, image: str
) -> None:
    host = oci_registry_auth.host
    answers(helper_dir, {host: [USER, "helper-secret-never-shown"]})
    creds = config(tmp_path, {"credHelpers": {host: "nctest"}})

    with pytest.raises(FetchError, match="refused the login") as info:
        await fetch(tmp_path, image, creds)
    assert "helper-secret-never-shown" not in str(info.value)


@pytest.mark.parametrize(
    ("answer", "helper", "said"),
    [
        ("crash", "nctest", r"docker-credential-nctest failed for .* \(exit 3\)"),
        ("garbage", "nctest", r"answered no JSON \{Username, Secret\}"),
        (["<token>", "refresh"], "nctest", "identity token"),
        (None, "missing", "docker-credential-missing .*credHelpers.* is not on PATH"),
    ],
)
async def test_helper_failures_are_clear_permanent_errors_without_secrets(
    tmp_path: Path,
    helper_dir: Path,
    oci_registry_auth: Registry,
    image: str,
    answer: object,
    helper: str,
    said: str,
) -> None:
    host = oci_registry_auth.host
    answers(helper_dir, {host: answer} if answer is not None else {})
    creds = config(tmp_path, {"credHelpers": {host: helper}})

    with pytest.raises(FetchError, match=said) as info:
        await fetch(tmp_path, image, creds)
    assert info.value.permanent
    assert PASSWORD not in str(info.value) and "refresh" not in str(info.value)


def test_a_helper_that_hangs_is_stopped_at_the_timeout(
    helper_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers(helper_dir, {"registry.example": "sleep"})
    monkeypatch.setattr(ociauth, "HELPER_TIMEOUT", 0.5)

    with pytest.raises(FetchError, match=r"did not answer for registry\.example within") as info:
        ociauth.run_helper("nctest", "registry.example", "credHelpers in a test")
    assert not info.value.permanent  # a slow keychain may answer next time


def test_docker_hub_is_asked_for_by_its_v1_server_url(helper_dir: Path) -> None:
    answers(helper_dir, {"https://index.docker.io/v1/": ["hubuser", "hubtoken"]})

    login = ociauth.find_login(DOCKER_HUB, {".dockerconfigjson": '{"credsStore": "nctest"}'})

    assert login == ociauth.Login("hubuser", "hubtoken")
    assert asked(helper_dir) == ["https://index.docker.io/v1/"]


def test_a_missing_creds_store_is_ignored_for_public_pulls(helper_dir: Path) -> None:
    config_text = '{"credsStore": "desktop", "auths": {}}'  # a laptop's config, copied
    assert ociauth.find_login("ghcr.io", {".dockerconfigjson": config_text}) is None
