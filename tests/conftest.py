from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from azurite import azure, azurite_server  # noqa: F401 - shared fixtures
from mlflow_server import mlflow_server  # noqa: F401 - shared fixture
from object_stores import gcs, gcs_server, s3, s3_server  # noqa: F401 - shared fixtures
from support import Agent, kill_tree

from nodecache.serve.examples import write_all_types_onnx, write_mlp_onnx


@pytest.fixture(scope="session")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one small ONNX MLP, FP32 [-1, 64] -> [-1, 10]."""
    folder = tmp_path_factory.mktemp("mlp")
    write_mlp_onnx(folder / "model.onnx")
    return folder


@pytest.fixture(scope="session")
def all_types_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX identity model with one input/output pair per OIP datatype."""
    folder = tmp_path_factory.mktemp("all_types")
    write_all_types_onnx(folder / "model.onnx")
    return folder


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent home; the test calls ``agent.start()``; always killed at the end."""
    a = Agent(tmp_path / "agent")
    yield a
    if a.proc is not None:
        kill_tree(a.proc)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA; elsewhere they are skipped, saying why."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
