"""Azurite (Microsoft's Azure Storage emulator, from npm) on loopback for the Azure Blob tests.

Installed on first use into ``.bench/azurite`` (kept between runs, as CI caches ``.bench/``),
started once per session with a fresh folder, stopped by PID. Registered for every test
module through ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, free_port

AZURITE_VERSION = "3.35.0"
AZURITE_DIR = ROOT / ".bench" / "azurite"
ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public; not a secret anywhere but in these tests).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
CONTAINER = "models"


@dataclass
class AzuriteServer:
    endpoint: str
    """The account's blob endpoint, ``http://127.0.0.1:PORT/devstoreaccount1``."""
    root: Path

    def connection_string(self, key: str = ACCOUNT_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.endpoint};"
        )

    def service(self) -> Any:
        """A synchronous ``BlobServiceClient`` of the emulator (to seed and alter blobs)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def container(self, name: str = CONTAINER) -> Any:
        client = self.service().get_container_client(name)
        with contextlib.suppress(Exception):  # ResourceExistsError when it exists already
            client.create_container()
        return client


def _azurite_blob() -> Path | None:
    """``azurite-blob``, installed with npm under ``.bench/azurite`` on first use."""
    binary = AZURITE_DIR / "bin" / "azurite-blob"
    if binary.exists():
        return binary
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None
    AZURITE_DIR.mkdir(parents=True, exist_ok=True)
    # From "/": run inside a folder holding a package.json, npm installs there instead.
    subprocess.run(
        ["npm", "install", "--global", "--prefix", str(AZURITE_DIR), "--no-audit",
         "--no-fund", "--silent", f"azurite@{AZURITE_VERSION}"],
        cwd="/", check=True, timeout=600,
    )  # fmt: skip
    return binary if binary.exists() else None


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    binary = _azurite_blob()
    if binary is None:
        pytest.skip("Azurite not installed and npm/node missing (apt-get install nodejs npm)")
    root = tmp_path_factory.mktemp("azurite")
    port = free_port()
    cmd = [
        str(binary),
        "--blobHost", "127.0.0.1",
        "--blobPort", str(port),
        "--location", str(root),
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
        "--silent",
    ]  # fmt: skip
    log = open(root / "azurite.log", "wb")  # noqa: SIM115 - closed after the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}?comp=list", timeout=1).read()
                break
            except urllib.error.HTTPError:
                break  # it answers (anonymous listing is refused): ready
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Azurite did not start: {(root / 'azurite.log').read_text()}")
                time.sleep(0.1)
        yield AzuriteServer(endpoint, root)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def azure(azurite_server: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> AzuriteServer:
    """The emulator, its ``models`` container made, its connection string in the
    environment and no other Azure setting there."""
    for name in list(os.environ):
        if name.startswith(("AZURE_", "AZ_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_server.connection_string())
    azurite_server.container()
    return azurite_server
