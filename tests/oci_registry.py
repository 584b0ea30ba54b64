"""A real OCI registry on loopback: the Docker distribution registry (Debian's
``docker-registry`` 2.8), with or without htpasswd auth, and artifacts pushed to it by ORAS.

The registry binary is taken from the Debian package without installing it (``apt-get
download`` + ``dpkg-deb -x`` into ``.bench/docker-registry``, once): installing the package
would start a system service on ``:5000`` on every interface.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, free_port, kill_tree, wait_for

CACHE = ROOT / ".bench" / "docker-registry"
BINARY = CACHE / "usr" / "bin" / "docker-registry"
USER, PASSWORD = "puller", "registry-pw-never-shown"
TITLE = "org.opencontainers.image.title"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def registry_binary() -> Path:
    """The ``docker-registry`` binary, fetched from Debian's archive on first use."""
    if BINARY.exists():
        return BINARY
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        pytest.skip("needs apt-get and dpkg-deb to fetch Debian's docker-registry")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["apt-get", "download", "docker-registry"],
            cwd=tmp,
            capture_output=True,
            timeout=300,
        )
        debs = list(Path(tmp).glob("docker-registry_*.deb"))
        if done.returncode or not debs:
            pytest.skip(f"cannot download docker-registry: {done.stderr.decode()[-300:]}")
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(CACHE, ignore_errors=True)
        shutil.move(str(staging), CACHE)
    return BINARY


def htpasswd_line(user: str, password: str) -> str:
    """``user:bcrypt`` as ``htpasswd -Bbn -C 4`` writes it (the registry accepts bcrypt
    only; the lowest cost, as the registry checks it on every request)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            pytest.skip("needs the crypt module for a bcrypt htpasswd")
    return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"


@dataclass
class Registry:
    """One running registry: where it listens, where it keeps blobs, how to log in."""

    host: str
    root: Path
    login: tuple[str, str] | None = None
    config: Path | None = None
    """A docker config.json with the login (None without auth)."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        if self.login is None:
            return {}
        raw = f"{self.login[0]}:{self.login[1]}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            f"http://{self.host}{path}",
            data=body,
            method=method,
            headers={**self.headers(), **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt them behind its back)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def manifest(self, repo: str, ref: str) -> tuple[dict[str, Any], str]:
        status, headers, body = self.request(
            "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST}
        )
        assert status == 200, (status, body)
        return json.loads(body), headers["Docker-Content-Digest"]

    def put_manifest(
        self, repo: str, ref: str, manifest: dict[str, Any], *, media_type: str = MANIFEST
    ) -> str:
        body = json.dumps(manifest).encode()
        status, _, answer = self.request(
            "PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type}
        )
        assert status == 201, (status, answer)
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def push_blob(self, repo: str, data: bytes) -> str:
        """One blob: an upload session (``POST``), then its bytes in one ``PUT``."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, headers, answer = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, (status, answer)
        location = urllib.parse.urlsplit(headers["Location"])
        sep = "&" if location.query else "?"
        target = f"{location.path}?{location.query}{sep}digest={digest}".replace("?&", "?")
        status, _, answer = self.request(
            "PUT", target, data, {"Content-Type": "application/octet-stream"}
        )
        assert status == 201, (status, answer)
        return digest

    def push_image(
        self, target: str, layers: list[tuple[bytes, str]], *, docker: bool = False
    ) -> str:
        """An image (OCI, or Docker v2 schema 2) of ``layers`` (bytes, media type), as a
        builder pushes one: each blob, a config, then the manifest. Returns its digest."""
        repo, _, tag = target.partition(":")
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
        ).encode()
        kind = DOCKER_MANIFEST if docker else MANIFEST
        config_type = (
            "application/vnd.docker.container.image.v1+json"
            if docker
            else "application/vnd.oci.image.config.v1+json"
        )
        manifest = {
            "schemaVersion": 2,
            "mediaType": kind,
            "config": {
                "mediaType": config_type,
                "digest": self.push_blob(repo, config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": media, "digest": self.push_blob(repo, data), "size": len(data)}
                for data, media in layers
            ],
        }
        return self.put_manifest(repo, tag, manifest, media_type=kind)

    def push_index(self, target: str, platforms: dict[str, str]) -> str:
        """An image index at ``target`` of images already pushed (architecture -> tag),
        each entry ``linux/<architecture>``. Returns its digest."""
        repo, _, tag = target.partition(":")
        entries = []
        for arch, ref in platforms.items():
            status, headers, body = self.request(
                "GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST}
            )
            assert status == 200, (status, body)
            entries.append({
                "mediaType": MANIFEST,
                "digest": headers["Docker-Content-Digest"],
                "size": len(body),
                "platform": {"architecture": arch, "os": "linux"},
            })  # fmt: skip
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}
        return self.put_manifest(repo, tag, index, media_type=INDEX)

    def push(
        self,
        target: str,
        files: dict[str, bytes],
        *,
        annotation: str = TITLE,
        media_type: str | None = None,
        config_media_type: str | None = None,
    ) -> None:
        """``oras push`` of ``files`` to ``target`` (``repo:tag``), each layer named by
        ``annotation`` (its relative path, subfolders included)."""
        import oras.client

        client = oras.client.OrasClient(hostname=self.host, insecure=True, auth_backend="basic")
        if self.login is not None:
            client.login(username=self.login[0], password=self.login[1], hostname=self.host)
        with tempfile.TemporaryDirectory() as tmp:
            names, annotations = [], {}
            for i, (rel, data) in enumerate(files.items()):
                blob = Path(tmp) / f"blob-{i}"
                blob.write_bytes(data)
                annotations[str(blob)] = {TITLE: rel, annotation: rel}
                names.append(f"{blob}:{media_type}" if media_type else str(blob))
            annotation_file = Path(tmp) / "annotations.json"
            annotation_file.write_text(json.dumps(annotations))
            config = None
            if config_media_type:
                config_file = Path(tmp) / "config.json"
                config_file.write_text('{"descriptor": {"name": "test"}}')
                config = f"{config_file}:{config_media_type}"
            client.push(
                target=f"{self.host}/{target}",
                files=names,
                annotation_file=str(annotation_file),
                manifest_config=config,
                disable_path_validation=True,
                quiet=True,
            )


def _config_yaml(root: Path, port: int, auth: Path | None) -> str:
    lines = [
        "version: 0.1",
        "log: {level: error, accesslog: {disabled: true}}",
        f"storage: {{filesystem: {{rootdirectory: {root}}}, delete: {{enabled: true}}}}",
        f"http: {{addr: 127.0.0.1:{port}}}",
    ]
    if auth is not None:
        lines.append(f"auth: {{htpasswd: {{realm: nodecache-test, path: {auth}}}}}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_registry(folder: Path, *, auth: bool = False) -> Iterator[Registry]:
    """A registry on a free loopback port, storing under ``folder``; stopped afterwards."""
    binary = registry_binary()
    root = folder / "storage"
    root.mkdir(parents=True)
    port = free_port()
    htpasswd = None
    registry = Registry(f"127.0.0.1:{port}", root)
    if auth:
        htpasswd = folder / "htpasswd"
        htpasswd.write_text(htpasswd_line(USER, PASSWORD) + "\n")
        registry.login = (USER, PASSWORD)
        registry.config = folder / "docker-config.json"
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        registry.config.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    config = folder / "config.yml"
    config.write_text(_config_yaml(root, port, htpasswd))
    log = (folder / "registry.log").open("wb")
    registry.proc = subprocess.Popen(
        [str(binary), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: _answers(registry), 15, f"registry on {registry.host}")
        yield registry
    finally:
        kill_tree(registry.proc)
        log.close()


def _answers(registry: Registry) -> bool:
    assert registry.proc is not None
    if registry.proc.poll() is not None:
        raise AssertionError(f"registry exited with {registry.proc.returncode}")
    try:
        status, _, _ = registry.request("GET", "/v2/")
    except OSError:
        return False
    return status in (200, 401)


@pytest.fixture(scope="session", name="oci_registry")
def registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="session", name="oci_registry_auth")
def auth_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry-auth"), auth=True) as registry:
        yield registry


__all__ = [
    "DOCKER_TAR_GZIP",
    "OCI_TAR",
    "OCI_TAR_GZIP",
    "PASSWORD",
    "USER",
    "Registry",
    "auth_registry_fixture",
    "registry_fixture",
    "run_registry",
]
