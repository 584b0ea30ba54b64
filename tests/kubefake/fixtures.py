"""Pytest fixtures for the fake API server; import them into a test module to use them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from .server import FakeApiServer

__all__ = ["api_client", "fake_api"]


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    """A fresh fake API server with nodecache's CRDs, on a free 127.0.0.1 port."""
    with FakeApiServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def api_client(fake_api: FakeApiServer) -> Iterator[client.ApiClient]:
    """The official client, configured for the fake exactly as for a cluster."""
    with client.ApiClient(fake_api.configuration()) as api:
        yield api
